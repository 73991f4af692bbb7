"""Benchmark: hcp's LoRA as a forward-hook branch against the same LoRA as a wrapper module.

    python bench/bench_lora_hook.py --device cpu             # CPU: 16x16 latent, batch 1, 1 thread, fp32
    python bench/bench_lora_hook.py --device cpu --latent 32 --rounds 5 --json /tmp/lora_hook.json
    python bench/bench_lora_hook.py --device cuda            # the issue's setting (below)

hcp puts a ``LoraBranch`` inside its host Linear and adds its output through a forward hook
(``plugins/adapters/lora/layer.py``), so the host keeps its class and parameter names; the
alternative replaces the Linear with a module computing ``base(x) + branch(x)``. One frozen
UNet2DConditionModel with SD 1.5's layout (random, seeded), one set of inputs, three variants:

* ``frozen``: no LoRA, gradient to the input latents (the cheapest meaningful baseline);
* ``hook``: hcp's LoRA adapter (rank 16, alpha 16) on to_q/k/v/out.0 of every attn1/attn2,
  attached by ``build_lora_adapter(...).attach`` as in training, toggled with ``detach_branch`` /
  ``attach_branch``;
* ``wrapper``: those Linears replaced by :class:`BranchWrapper`, which calls a copy of the same
  ``LoraBranch`` directly (same math and dtypes, autocast or not), so only the dispatch differs.
  Before timing, hook and wrapper must give the same output and factor gradients with non-zero
  ``up`` factors, and differ from ``frozen``.

One step = forward (autocast when bf16) + MSE loss + backward + AdamW step on the variant's factors
(frozen: no optimizer). After ``--warmup`` steps each, the variants take turns (``--steps`` each,
order rotating) for ``--rounds`` rounds, so a noisy machine slows them alike. Reported: median and
best s/step, ratios of medians and medians of per-round ratios (on the CPU also by process CPU
time, which other jobs disturb less); on CUDA (clocks read after a synchronize) also each variant's
peak ``max_memory_allocated`` over two more steps in a pass of its own.

Defaults: CPU: 16x16 latent, batch 1, fp32, 1 thread (multi-thread timings on a shared machine are
erratic; bench_lora.py's 32x32 takes ~8 s a step on one EPYC core). CUDA: the issue's setting,
64x64 latent (512 px), batch 4, bf16 autocast, frozen weights bf16 and LoRA factors fp32 (as hcp's
``place_models``), context 77x768.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import sync  # noqa: E402
from bench_lora import build_unet  # noqa: E402
from bench_train import ATTN_PATTERN, ATTN_PROJECTIONS  # noqa: E402
from hcp_core.interfaces import AdapterContext, ModelBundle  # noqa: E402
from hcp_plugins.adapters.lora.adapter import build_lora_adapter  # noqa: E402
from hcp_plugins.adapters.lora.config import LoraGroupConfig  # noqa: E402
from hcp_plugins.adapters.lora.layer import BRANCH_ATTR, LoraBranch, attach_branch, detach_branch  # noqa: E402

VARIANTS = ("frozen", "hook", "wrapper")
CLOCKS = ("wall", "cpu")
LR = 1e-4


class BranchWrapper(nn.Module):
    """The wrapper alternative: in the Linear's place, ``base(x) + branch(x)`` exactly as
    ``_add_branch_output`` adds it (the branch's output cast to the base output's dtype)."""

    def __init__(self, base: nn.Linear, branch: LoraBranch) -> None:
        super().__init__()
        self.base = base
        self.lora = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.lora(x).to(out.dtype)


class Layouts:
    """Switches the one UNet between the variants; each LoRA variant keeps its own factors and AdamW."""

    def __init__(self, unet: nn.Module, rank: int) -> None:
        unet.requires_grad_(False)
        bundle = ModelBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
        group = LoraGroupConfig(layers=[r"re:.*\.attn[12]$"], rank=rank, alpha=float(rank))
        adapter = build_lora_adapter({"unet": [group]}, context=AdapterContext(exp_dir="."))
        adapter.attach(bundle)
        wanted = {f"{n}.{p}" for n, _ in unet.named_modules() if ATTN_PATTERN.match(n) for p in ATTN_PROJECTIONS}
        got = {layer.name for layer in adapter.layers.values()}
        if got != wanted:
            raise SystemExit(f"hcp's adapter chose other layers than to_q/k/v/out.0: {sorted(got ^ wanted)[:4]}")
        self.sites = []  # (parent, attribute, host, hook branch, wrapper)
        for layer in adapter.layers.values():
            parent_name, _, child = layer.name.rpartition(".")
            self.sites.append((unet.get_submodule(parent_name), child, layer.host, layer.branch,
                               BranchWrapper(layer.host, copy.deepcopy(layer.branch))))
        self.params = {"hook": [p for s in self.sites for p in s[3].parameters()],
                       "wrapper": [p for s in self.sites for p in s[4].lora.parameters()]}

    def use(self, variant: str) -> None:
        for parent, child, host, branch, wrapper in self.sites:
            if BRANCH_ATTR in host._modules:
                detach_branch(host)
            setattr(parent, child, wrapper if variant == "wrapper" else host)
            if variant == "hook":
                attach_branch(host, branch)


def make_step(unet: nn.Module, inputs: Dict[str, torch.Tensor], autocast: Optional[torch.dtype],
              opt: Optional[torch.optim.Optimizer]) -> Callable[[], torch.Tensor]:
    """One training step of a variant; without ``opt`` (frozen) the gradient goes to the input latents."""
    device = inputs["x"].device

    def step() -> torch.Tensor:
        x = inputs["x"] if opt is not None else inputs["x"].detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            pred = unet(x, inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
        loss = F.mse_loss(pred.float(), inputs["target"])
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return pred.detach()

    return step


def check_same(layouts: Layouts, unet: nn.Module, inputs: Dict[str, torch.Tensor], autocast: Optional[torch.dtype]) -> str:
    """Hook and wrapper with the same non-zero factors: same output and factor gradients, unlike frozen."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, _, branch, wrapper in layouts.sites:
            branch.up.weight.copy_(torch.randn(branch.up.weight.shape, generator=g) * 0.02)
            wrapper.lora.load_state_dict(branch.state_dict())
    outs, grads = {}, {}
    for variant in VARIANTS:
        layouts.use(variant)
        outs[variant] = make_step(unet, inputs, autocast, None)()  # gradients only, no optimizer step
        grads[variant] = [p.grad for p in layouts.params.get(variant, [])]
        unet.zero_grad(set_to_none=True)
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    diff = (outs["hook"] - outs["wrapper"]).abs().max().item()
    effect = (outs["hook"] - outs["frozen"]).abs().max().item()
    same_grads = all(a is not None and b is not None and torch.allclose(a, b, **tol)
                     for a, b in zip(grads["hook"], grads["wrapper"]))
    if not torch.allclose(outs["hook"], outs["wrapper"], **tol) or not same_grads or effect <= 10 * diff:
        raise SystemExit(f"hook and wrapper disagree: max output diff {diff:.3g} (LoRA's effect {effect:.3g}), "
                         f"gradients equal: {same_grads}")
    return f"hook == wrapper: max |output diff| {diff:.3g}, LoRA's effect {effect:.3g}, {len(grads['hook'])} gradients equal"


def peak_memory_mib(step: Callable[[], Any], device: torch.device) -> Dict[str, float]:
    """Peak allocated CUDA memory over two steps, and what the steps add over the memory before them."""
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(2):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "step_adds_mib": (peak - before) / 2**20}


Times = Dict[str, Dict[str, List[float]]]  # clock ("wall", "cpu") -> variant -> seconds


def time_rounds(layouts: Layouts, run: Dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                steps: int, warmup: int) -> Tuple[Times, Times]:
    """The variants in turns (the order rotating each round): seconds of every timed step and each
    round's mean, per clock and variant; a first, untimed round runs ``warmup`` steps of each. The
    "cpu" clock is this process's CPU time: other jobs on a shared CPU disturb it less than wall time."""
    times: Times = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
    round_means: Times = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
    for r in range(-1, rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            layouts.use(v)
            mine: Dict[str, List[float]] = {c: [] for c in CLOCKS}
            for _ in range(warmup if r < 0 else steps):
                sync(device)
                start = (time.perf_counter(), time.process_time())
                run[v]()
                sync(device)  # CUDA runs asynchronously: the step is over when the device is done
                for c, now, t0 in zip(CLOCKS, (time.perf_counter(), time.process_time()), start):
                    mine[c].append(now - t0)
            for c in CLOCKS if r >= 0 else ():
                times[c][v] += mine[c]
                round_means[c][v].append(statistics.fmean(mine[c]))
        if r >= 0:
            cpu = {v: f" (CPU {round_means['cpu'][v][-1]:.3f}s)" if device.type == "cpu" else "" for v in order}
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{v} {round_means['wall'][v][-1]:.3f}s{cpu[v]}" for v in order), flush=True)
    return times, round_means


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def main(argv: Optional[List[str]] = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, at least 1 (each variant --steps steps per round)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default CPU 1, CUDA 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default CPU 1, CUDA 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default CPU 16, CUDA 64 = 512 px)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default CPU 1, CUDA 4)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit("--rounds and --steps must be at least 1")
    on_gpu = args.device == "cuda"
    steps = args.steps or (10 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    latent, batch = args.latent or (64 if on_gpu else 16), args.batch or (4 if on_gpu else 1)
    autocast = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and on_gpu) else None
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    unet = build_unet()  # seeded; diffusers' init (tiny random weights could hit slow CPU denormals)
    layouts = Layouts(unet, args.rank)
    unet.to(device).train()  # moves the hook branches (attached now) but not the wrappers' copies:
    for site in layouts.sites:
        site[4].to(device)
    if autocast is not None:  # frozen weights in half precision, LoRA factors fp32 (hcp's place_models)
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(autocast)
    g, shape = torch.Generator().manual_seed(1), (batch, 4, latent, latent)
    inputs = {k: v.to(device) for k, v in {
        "x": torch.randn(shape, generator=g), "t": torch.full((batch,), 500),
        "ctx": torch.randn(batch, 77, 768, generator=g), "target": torch.randn(shape, generator=g)}.items()}
    print(check := check_same(layouts, unet, inputs, autocast), flush=True)

    opts = {v: torch.optim.AdamW(ps, lr=LR) for v, ps in layouts.params.items()}
    run = {v: make_step(unet, inputs, autocast, opts.get(v)) for v in VARIANTS}
    times, round_means = time_rounds(layouts, run, device, args.rounds, steps, warmup)
    memory = {}
    if on_gpu:
        for v in VARIANTS:
            layouts.use(v)
            memory[v] = peak_memory_mib(run[v], device)

    med = {c: {v: statistics.median(times[c][v]) for v in VARIANTS} for c in CLOCKS}
    precision = "bf16 autocast" if autocast else "fp32"
    print(f"\nUNet2DConditionModel (SD 1.5 layout), {device_name(device)}, {args.device}"
          f"{f', {args.threads} thread(s)' if not on_gpu else ''}, {precision}, latent {latent}x{latent}, batch {batch}, "
          f"LoRA rank {args.rank} on {len(layouts.sites)} attention projections; {args.rounds} rounds x {steps} step(s)")
    clocks = CLOCKS[:1] if on_gpu else CLOCKS  # a process spinning in cuda.synchronize makes CPU time meaningless
    print("| variant | median s/step | best s/step | steps |" + (" peak MiB | step adds MiB |" if on_gpu else
                                                                 " median CPU s/step | best CPU s/step |"))
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        extra = (f" {memory[v]['peak_mib']:.0f} | {memory[v]['step_adds_mib']:.0f} |" if on_gpu else
                 f" {med['cpu'][v]:.4f} | {min(times['cpu'][v]):.4f} |")
        print(f"| {v} | {med['wall'][v]:.4f} | {min(times['wall'][v]):.4f} | {len(times['wall'][v])} |{extra}")
    ratios: Dict[str, Dict[str, float]] = {}
    for (a, b), c in ((pair, c) for c in clocks for pair in (("hook", "wrapper"), ("hook", "frozen"), ("wrapper", "frozen"))):
        of_medians = med[c][a] / med[c][b]
        paired = statistics.median(x / y for x, y in zip(round_means[c][a], round_means[c][b]))
        ratios[f"{a}/{b} {c}"] = {"of_medians": of_medians, "median_per_round": paired}
        print(f"{a}/{b} ({c} time): {of_medians:.3f}x (median of per-round ratios {paired:.3f}x)")
    wall = time.perf_counter() - t0
    print(f"(wall time {wall:.0f}s including the model build and the check)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            vars(args), device_name=device_name(device), torch=torch.__version__, precision=precision, latent=latent,
            batch=batch, steps=steps, warmup=warmup, check=check, seconds=times, median=med, ratios=ratios,
            memory_mib=memory, wall_s=wall), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
