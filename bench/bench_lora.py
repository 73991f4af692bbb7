"""Benchmark: what LoRA costs on an SD 1.5-sized UNet, in time and in training memory.

    python bench/bench_lora.py                  # timings + memory (full fine-tune needs ~15 GB RAM)
    python bench/bench_lora.py --no-full-memory # skip the full fine-tune memory run
    python bench/bench_lora.py --repeats 5 --latent 32 --threads 2

The UNet is diffusers' ``UNet2DConditionModel`` with its default (SD 1.5) layout and
``cross_attention_dim=768``, random weights, on the CPU, batch 1 with a small latent (32x32 by
default, i.e. 256x256 pixels). LoRA goes where the original guide puts it: every attention block
(``re:.*\\.attn[12]$``: to_q/k/v/out) and feed-forward (``re:.*\\.ff$``).

Timing (one process, the same model and inputs, forward + backward; the variants run in turns,
round after round, so a busy machine slows them alike; the best and the median of ``--repeats``
rounds; one thread by default, because on a shared machine OpenMP threads waiting for each other
make multi-thread CPU timings erratic):

* ``frozen``: no LoRA, weights frozen, gradient to the input latents (the backward pass through
  the activations that any adapter needs; the cheapest meaningful baseline);
* ``lora r4`` / ``lora r64``: frozen base + LoRA, gradients into the LoRA factors;
* ``full``: no LoRA, every UNet weight trained (full fine-tune).

Memory: each variant runs two AdamW steps in a child process whose UNet is built on the meta
device and then materialised once (so building it leaves no higher peak behind); the peak RSS
over the RSS before training is what training adds (gradients, optimizer state, activations).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

LAYERS = [r"re:.*\.attn[12]$", r"re:.*\.ff$"]


def build_unet(materialise_once: bool = False):
    """SD 1.5's UNet layout with random weights (seeded).

    ``materialise_once`` builds it on the meta device and then allocates each weight once, so the
    process's peak memory is the model itself (diffusers' normal init briefly holds more).
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if not materialise_once:
        return UNet2DConditionModel(cross_attention_dim=768)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    return unet


def attach(unet, rank: int):
    """Frozen UNet + hcp LoRA of ``rank`` on the attention and feed-forward blocks; returns params."""
    from hcp_core.interfaces import AdapterContext, ModelBundle
    from hcp_plugins.adapters.lora.adapter import build_lora_adapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    unet.requires_grad_(False)
    bundle = ModelBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    sections = {"unet": [LoraGroupConfig(layers=LAYERS, rank=rank)]}
    adapter = build_lora_adapter(sections, context=AdapterContext(exp_dir="."))
    param_groups = adapter.attach(bundle)
    return adapter, [p for g in param_groups for p in g["params"]]


def inputs(latent: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, latent, latent, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g))


def step_time(unet, x, t, ctx, input_grad: bool) -> float:
    """Seconds of one forward + backward."""
    unet.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(input_grad)
    start = time.perf_counter()
    unet(xi, t, encoder_hidden_states=ctx).sample.square().mean().backward()
    return time.perf_counter() - start


def one_round(unet, x, t, ctx, out: Dict[str, List[float]], params: Dict[str, int]) -> None:
    """Each variant once: frozen, LoRA rank 4 and 64 (attached, timed, detached), full fine-tune."""
    unet.requires_grad_(False)
    out.setdefault("frozen", []).append(step_time(unet, x, t, ctx, input_grad=True))
    for rank in (4, 64):
        adapter, trainable = attach(unet, rank)
        out.setdefault(f"lora r{rank}", []).append(step_time(unet, x, t, ctx, input_grad=False))
        params[f"lora r{rank}"] = sum(p.numel() for p in trainable)
        adapter.detach()
    unet.requires_grad_(True)
    out.setdefault("full", []).append(step_time(unet, x, t, ctx, input_grad=False))
    params["full"] = sum(p.numel() for p in unet.parameters())
    unet.zero_grad(set_to_none=True)


def run_timings(repeats: int, latent: int) -> Dict[str, Any]:
    unet = build_unet()
    x, t, ctx = inputs(latent)
    times: Dict[str, List[float]] = {}
    params: Dict[str, int] = {}
    one_round(unet, x, t, ctx, {}, params)  # warm-up
    for _ in range(repeats):
        one_round(unet, x, t, ctx, times, params)
    return {
        "best": {k: min(v) for k, v in times.items()},
        "median": {k: statistics.median(v) for k, v in times.items()},
        "all": times,
        "params": params,
    }


def memory_child(variant: str, latent: int) -> None:
    """Runs in a child: two AdamW steps of ``variant``; prints the RSS growth in MiB as JSON."""
    import torch

    unet = build_unet(materialise_once=True)
    if variant == "full":
        params = list(unet.parameters())
    else:
        _, params = attach(unet, int(variant))
    x, t, ctx = inputs(latent)
    before = _status_kib("VmRSS")
    opt = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        opt.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"variant": variant, "model_mib": before / 1024, "training_mib": (peak - before) / 1024}))


def _status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in KiB.

    Not ``ru_maxrss``: on Linux a child inherits its parent's peak through fork and exec, so a
    child started by a parent that holds a model would report the parent's memory.
    """
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_memory(variants: List[str], latent: int, threads: int) -> Dict[str, Dict[str, float]]:
    out = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--child", variant, "--latent", str(latent), "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-full-memory", action="store_true", help="skip the full fine-tune memory child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args.child, args.latent)
        return

    result = run_timings(args.repeats, args.latent)
    best, median, params = result["best"], result["median"], result["params"]
    print(f"UNet2DConditionModel (SD 1.5 layout, cross_attention_dim=768), CPU, {args.threads} thread(s), "
          f"latent {args.latent}x{args.latent}, batch 1; forward+backward over {args.repeats} rounds")  # fmt: skip
    print("| variant | best s | median s | best vs frozen | best vs full fine-tune | trainable params |")
    print("|---|---|---|---|---|---|")
    for name in ("frozen", "lora r4", "lora r64", "full"):
        print(f"| {name} | {best[name]:.3f} | {median[name]:.3f} | {best[name] / best['frozen']:.2f} | "
              f"{best[name] / best['full']:.2f} | {params.get(name, 0):,} |")  # fmt: skip

    variants = ["4", "64"] + ([] if args.no_full_memory else ["full"])
    memory = run_memory(variants, args.latent, args.threads)
    print("\nTraining memory (two AdamW steps; peak RSS growth after the model is built)")
    print("| variant | model MiB | training adds MiB |")
    print("|---|---|---|")
    for variant, m in memory.items():
        name = "full fine-tune" if variant == "full" else f"lora r{variant}"
        print(f"| {name} | {m['model_mib']:.0f} | {m['training_mib']:.0f} |")
    print(json.dumps({"timings": result, "memory": memory}))


if __name__ == "__main__":
    main()
