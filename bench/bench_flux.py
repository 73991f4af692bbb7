"""Benchmark: hcp's FLUX LoRA training step against a minimal hand-written flow-matching loop.

    python bench/bench_flux.py                  # 2 warm-up + 10 timed steps per variant (CPU: ~2 min)
    python bench/bench_flux.py --quick          # a smoke run: 1 warm-up + 4 timed steps
    python bench/bench_flux.py --variants minimal-b,hcp,hcp-text --steps 12   # with an A/A control
    python bench/bench_flux.py --threads 2      # torch threads per process (default 1, see --help)
    python bench/bench_flux.py --device cuda --steps 30 --heads 24   # on a GPU (the default when there is one)

The model is a FLUX.1-dev-architecture diffusers folder with random weights, written offline by
``hcp_core.demo.flux.build_demo_flux_model`` with FLUX's structure at reduced depth and width:

* transformer: ``FluxTransformer2DModel`` with FLUX's head width (128) and RoPE axes (16, 56, 56),
  6 heads (hidden 768; FLUX: 24, hidden 3072), 2 joint (double-stream) + 4 single-stream blocks
  (FLUX: 19 + 38), a guidance embedding (dev-style), ``joint_attention_dim`` 4096 and
  ``pooled_projection_dim`` 768 as FLUX;
* text encoders of those widths: a 1-layer T5 encoder with ``d_model`` 4096 (FLUX: T5-XXL, 24
  layers) and a 1-layer CLIP text model of CLIP-L's width 768 (FLUX: 12 layers);
* the demo's 16-channel VAE (8x downsampling) and FLUX-dev's flow-matching scheduler config.

Data: four 128x128 PNG images with captions (``_sd15_arch.write_images``), a fixed 128x128 bucket
(8x8 latents, 16 packed image tokens), T5 prompts of 128 tokens (``max_sequence_length``),
batch 1, LoRA rank 4 / alpha 4 on ``attn.to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every block
(``re:.*attn\\.(to_q|to_k|to_v|to_out\\.0)$``), AdamW (lr 1e-4, weight decay 0.01), fp32,
no gradient clipping on either side.

* ``minimal``: freeze everything, wrap those Linear layers in a tiny LoRA module, encode every
  image (VAE) and caption (CLIP pooled + T5 hidden) once, then per step: noise, sigma =
  sigmoid(N(0, 1)) with FLUX's resolution-dependent shift, ``x_t = (1 - sigma) x0 + sigma noise``,
  pack 2x2, transformer(x_t, sigma, guidance, pooled, T5 states, position ids), MSE to the packed
  velocity ``noise - x0``, backward, AdamW. No framework.
* ``hcp``: ``build_run(load_config(toml), overwrite=True)`` + ``train(run)`` on the equivalent
  pipeline (``[[lora_transformer]]``, ``cache_latents = true``, ``model.cache_text = true``: every
  prompt encoded once, the text encoders moved off the device).
* ``hcp-text``: the same with ``model.cache_text = false``: the prompts go through CLIP and T5 every
  step (slower by the text encoders' forward; shown for memory).
* ``minimal-b``: a second, identical minimal loop: its ratio to ``minimal`` is the noise floor.

Timing and memory use ``bench_train.py``'s machinery (imported, not copied): every variant in its
own process, one step per process in turn, round after round, rotating the order; the step clock
runs from "go" to the end of the optimizer step (for hcp, a stand-in LR scheduler stops it); the
first ``--warmup`` rounds are dropped; medians. On CUDA every mark synchronises the device first
(both sides alike), and GPU memory is ``torch.cuda.memory_allocated`` when the steps begin and
``max_memory_allocated`` during the steps. On the CPU memory is RSS: with ``cache_text`` the text
encoders "leave the device" by moving to the CPU, which on a CPU run is where they already are,
so RSS does not drop there (see the summary line).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (  # noqa: E402  (bench/ is on sys.path only from here on)
    Channel,
    LoraLinear,
    StepClock,
    TimedScheduler,
    Worker,
    after,
    parse_variants,
    print_profiles,
    run_lock_step as lock_step,
)

LORA_RANK = 4
LORA_ALPHA = 4.0
LR = 1e-4
WEIGHT_DECAY = 1e-2
#: The layers both sides put LoRA on (hcp's pattern uses re.match, so this is the same set).
LORA_PATTERN = r".*attn\.(to_q|to_k|to_v|to_out\.0)$"
VARIANTS = ("minimal", "hcp", "hcp-text", "minimal-b")
#: Where a step's wall time goes. The last one must be bench_train's (StepClock.step_done ends it).
PARTS = ("latents", "noise + sigma + text", "transformer forward", "backward", "optimizer + rest")
GUIDANCE = 1.0
#: Default transformer sizes: FLUX's head width and RoPE axes, fewer heads and blocks.
HEADS, HEAD_DIM, AXES = 6, 128, (16, 56, 56)
JOINT_BLOCKS, SINGLE_BLOCKS = 2, 4
T5_WIDTH, CLIP_WIDTH, TEXT_LAYERS = 4096, 768, 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- worker side
class MemChannel(Channel):
    """bench_train's channel; its "done" message also carries ``extra`` (the GPU memory figures)."""

    def __init__(self) -> None:
        self.extra: Dict[str, Any] = {}

    def send(self, kind: str, **data: Any) -> None:
        super().send(kind, **(dict(data, **self.extra) if kind == "done" else data))


class DeviceClock(StepClock):
    """bench_train's StepClock that synchronises CUDA before every mark and records GPU memory."""

    def __init__(self, device: torch.device, channel: MemChannel, *args: Any) -> None:
        super().__init__(channel, *args)
        self.device = device
        self.mem = channel

    def begin(self, trainable: int) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mem.extra.update(gpu_setup_peak_mib=torch.cuda.max_memory_allocated(self.device) / 2**20,
                                  gpu_before_mib=torch.cuda.memory_allocated(self.device) / 2**20)
            torch.cuda.reset_peak_memory_stats(self.device)
        super().begin(trainable)

    def mark(self, part: str) -> None:
        sync(self.device)
        super().mark(part)

    def finish(self) -> None:
        if self.device.type == "cuda":
            self.mem.extra["gpu_peak_steps_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        super().finish()


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FLUX's 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def minimal_worker(args: argparse.Namespace, clock: DeviceClock, device: torch.device) -> None:
    """The hand-written flow-matching LoRA loop: diffusers/transformers only."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    model = args.model
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2")
    clip_tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    t5_tok = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    sched = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    for module in (transformer, vae, clip, t5):
        module.requires_grad_(False)
        module.eval()
        module.to(device)

    torch.manual_seed(args.seed)
    pattern = re.compile(LORA_PATTERN)
    lora_params: List[torch.nn.Parameter] = []
    for name, _ in [(n, m) for n, m in transformer.named_modules() if pattern.match(n)]:
        parent_name, _, child = name.rpartition(".")
        wrapped = LoraLinear(transformer.get_submodule(name), LORA_RANK, LORA_ALPHA).to(device)
        setattr(transformer.get_submodule(parent_name), child, wrapped)  # "to_out.0": the ModuleList's item 0
        lora_params += [wrapped.down.weight, wrapped.up.weight]
    transformer.train()
    optimizer = torch.optim.AdamW(lora_params, lr=LR, weight_decay=WEIGHT_DECAY)

    # Everything fixed is computed once: latents, text embeddings, position ids, shift, guidance.
    images = sorted(Path(args.data).glob("*.png"))
    latents, pooled, hidden = [], [], []
    with torch.no_grad():
        for path in images:
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
            pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None].float().to(device) / 127.5 - 1.0
            z = vae.encode(pixels).latent_dist.sample()
            latents.append(((z - vae.config.shift_factor) * vae.config.scaling_factor).contiguous())
            caption = path.with_suffix(".txt").read_text().strip()
            ids = clip_tok(caption, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
            pooled.append(clip(ids).pooler_output)
            ids = t5_tok(caption, padding="max_length", max_length=args.t5_tokens, truncation=True,
                         return_tensors="pt").input_ids.to(device)
            hidden.append(t5(ids).last_hidden_state)
    clip.to("cpu")
    t5.to("cpu")
    _, _, h, w = latents[0].shape
    tokens = (h // 2) * (w // 2)
    slope = (sched["max_shift"] - sched["base_shift"]) / (sched["max_image_seq_len"] - sched["base_image_seq_len"])
    shift = math.exp(sched["base_shift"] + slope * (tokens - sched["base_image_seq_len"]))
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    img_ids = img_ids.reshape(tokens, 3).to(device)
    txt_ids = torch.zeros(args.t5_tokens, 3, device=device)
    guidance = torch.full((1,), GUIDANCE, device=device)

    clock.begin(trainable=sum(p.numel() for p in lora_params))
    for step in range(args.total_steps):
        i = step % len(images)
        x0 = latents[i]
        clock.mark(PARTS[0])
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(1, device=device))
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        noisy = (1 - sigma) * x0 + sigma * noise
        clock.mark(PARTS[1])
        pred = transformer(hidden_states=pack(noisy), timestep=sigma, guidance=guidance, pooled_projections=pooled[i],
                           encoder_hidden_states=hidden[i], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        clock.mark(PARTS[2])
        loss = F.mse_loss(pred.float(), pack(noise - x0).float())
        loss.backward()
        clock.mark(PARTS[3])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(loss=float(loss.detach()))
    clock.finish()


def pipeline_toml(args: argparse.Namespace, exp_dir: str, *, cache_text: bool) -> str:
    """The hcp pipeline equivalent to the minimal loop (paths written as JSON strings, valid TOML)."""
    return f"""
seed = {args.seed}
exp_dir = {json.dumps(exp_dir)}

[model]
pretrained = {json.dumps(args.model)}
cache_text = {"true" if cache_text else "false"}
family = {{ type = "flux", max_sequence_length = {args.t5_tokens}, guidance = {GUIDANCE} }}

[train]
max_steps = {args.total_steps}
save_every = 0
log_every = 1000
max_grad_norm = 0
optimizer = {{ type = "adamw", weight_decay = {WEIGHT_DECAY} }}
scheduler = {{ type = "constant" }}

[data.bench]
batch_size = 1
cache_latents = true
bucket = {{ type = "fixed", target_size = [{args.size}, {args.size}] }}

[[data.bench.sources]]
type = "image_folder"
img_root = {json.dumps(args.data)}

[[lora_transformer]]
lr = {LR}
rank = {LORA_RANK}
alpha = {LORA_ALPHA}
layers = ['re:{LORA_PATTERN}']
"""


def hcp_worker(args: argparse.Namespace, clock: DeviceClock, device: torch.device) -> None:
    """hcp's own run, timed from the outside (the parts marked through wrappers and a forward hook)."""
    import attrs

    import hcp_core
    from hcp_core.train import loop
    from hcp_core.train.runner import build_run, train

    exp_dir = Path(args.work) / f"exp-{args.worker}"
    toml = Path(args.work) / f"{args.worker}.toml"
    toml.write_text(pipeline_toml(args, str(exp_dir), cache_text=args.worker == "hcp"))
    run = build_run(hcp_core.load_config(toml), overwrite=True)
    if run.accelerator.device.type != device.type:
        raise RuntimeError(f"hcp runs on {run.accelerator.device}, the bench asked for {device}")
    loop.latents_of = after(loop.latents_of, clock, PARTS[0])
    run.models.transformer.register_forward_hook(lambda *_: clock.mark(PARTS[2]))
    run.accelerator.backward = after(run.accelerator.backward, clock, PARTS[3])
    run = attrs.evolve(run, prompt_encoder=after(run.prompt_encoder, clock, PARTS[1]),
                       lr_scheduler=TimedScheduler(run.lr_scheduler, clock))
    clock.begin(trainable=sum(p.numel() for p in run.trained_params))
    try:
        train(run)
    finally:
        run.close()
    clock.finish()


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = DeviceClock(device, MemChannel(), args.total_steps, args.warmup, args.profile_out)
    (minimal_worker if args.worker.startswith("minimal") else hcp_worker)(args, clock, device)


# ---------------------------------------------------------------------------- parent side
class FluxWorker(Worker):
    """bench_train's Worker (receive / step / close), started on this script."""

    def __init__(self, variant: str, args: argparse.Namespace, work: Path, data: Path) -> None:  # noqa: D107
        self.variant = variant
        self.log_path = work / f"{variant}.log"
        self.profile_path = work / f"{variant}.prof" if args.profile else None
        cmd = [sys.executable, __file__, "--worker", variant, "--model", str(args.model), "--data", str(data),
               "--work", str(work), "--total-steps", str(args.warmup + args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--seed", str(args.seed), "--device", args.device,
               "--size", str(args.size), "--t5-tokens", str(args.t5_tokens)]
        if self.profile_path:
            cmd += ["--profile-out", str(self.profile_path)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # hcp picks CUDA whenever it sees one
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.steps: List[float] = []
        self.cpu_steps: List[float] = []
        self.fault_steps: List[int] = []
        self.part_steps: List[Dict[str, float]] = []
        self.info: Dict[str, Any] = {}


def run_lock_step(variants: Sequence[str], args: argparse.Namespace, work: Path, data: Path) -> List[FluxWorker]:
    """bench_train's lock step with FLUX workers: one step per process in turn, the order rotating."""
    return lock_step(variants, args, work, data, worker=FluxWorker)


def ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(ratio of medians, median of the per-round ratios, ratio of the fastest steps).

    Other jobs on the machine only ever add time, so on a loaded machine the fastest step of each
    side is the steadiest estimate of its own cost; the medians show what the load did.
    """
    return (statistics.median(a) / statistics.median(b), statistics.median(x / y for x, y in zip(a, b)),
            min(a) / min(b))


def summarise(workers: List[FluxWorker], args: argparse.Namespace) -> List[str]:
    """The table, the parts, the ratios and the one-line summary."""
    warm, cuda = args.warmup, args.device == "cuda"
    mem_cols = (("GPU MiB at step 1", "gpu_before_mib"), ("GPU peak in steps", "gpu_peak_steps_mib")) if cuda else ()
    lines = [f"{'variant':<11}{'wall s/step':>12}{'min':>8}{'max':>8}{'CPU s/step':>11}{'steps':>6}"
             f"{'peak RSS MiB':>13}{'RSS at step 1':>14}{'RSS peak in steps':>18}" + "".join(f"{c:>19}" for c, _ in mem_cols)]
    for w in workers:
        timed = w.steps[warm:]
        peak = w.info.get("peak_steps_mib")
        lines.append(
            f"{w.variant:<11}{statistics.median(timed):>12.3f}{min(timed):>8.3f}{max(timed):>8.3f}"
            f"{statistics.median(w.cpu_steps[warm:]):>11.3f}{len(timed):>6}{w.info['maxrss_mib']:>13.0f}"
            f"{w.info['rss_before_mib']:>14.0f}" + (f"{peak:>18.0f}" if peak else f"{'n/a':>18}")
            + "".join(f"{w.info.get(k, float('nan')):>19.0f}" for _, k in mem_cols))
    lines.append("(medians over the timed steps)")
    lines.append("")
    lines.append(f"{'median wall s':<22}" + "".join(f"{w.variant:>11}" for w in workers))
    for part in PARTS:
        lines.append(f"{part:<22}" + "".join(
            f"{statistics.median(p.get(part, 0.0) for p in w.part_steps[warm:]):>11.4f}" for w in workers))
    lines.append("")
    base = next(w for w in workers if w.variant == "minimal")
    for w in workers:
        if w is not base:
            for label, mine, theirs in (("step time", w.steps, base.steps), ("CPU time", w.cpu_steps, base.cpu_steps)):
                r, paired, fastest = ratio(mine[warm:], theirs[warm:])
                lines.append(f"{w.variant}/minimal {label}: {r:.3f}x (median of per-round ratios {paired:.3f}x, "
                             f"fastest steps {fastest:.3f}x)")
    lines.append("")
    by = {w.variant: w for w in workers}
    summary = f"FLUX (reduced depth), {args.device}:"
    if "hcp" in by:
        r, paired, fastest = ratio(by["hcp"].steps[warm:], base.steps[warm:])
        summary += (f" hcp/minimal step time {r:.3f}x (per round {paired:.3f}x, fastest steps {fastest:.3f}x; "
                    f"target <= 1.02 on the medians: {'met' if r <= 1.02 else 'NOT met'});")
        if "minimal-b" in by:
            summary += f" A/A minimal-b/minimal {ratio(by['minimal-b'].steps[warm:], base.steps[warm:])[0]:.3f}x;"
    if "hcp" in by and "hcp-text" in by:
        on, off = by["hcp"].info, by["hcp-text"].info
        if cuda:
            summary += (f" GPU at step 1 / peak in steps, cache_text on {on['gpu_before_mib']:.0f} / "
                        f"{on['gpu_peak_steps_mib']:.0f} MiB vs off {off['gpu_before_mib']:.0f} / "
                        f"{off['gpu_peak_steps_mib']:.0f} MiB")
        else:
            summary += (f" peak RSS cache_text on {on['maxrss_mib']:.0f} MiB vs off {off['maxrss_mib']:.0f} MiB "
                        "(CPU run: the text encoders move to the CPU, where they already are, so RSS does not drop)")
    lines.append(summary.rstrip(";"))
    return lines


def ensure_model(args: argparse.Namespace) -> Path:
    """The reduced-depth FLUX folder for these sizes, built (offline, ~1 GiB) if missing."""
    from hcp_core.demo.flux import build_demo_flux_model

    sizes = dict(num_layers=args.joint_blocks, num_single_layers=args.single_blocks, heads=args.heads,
                 head_dim=HEAD_DIM, axes_dims_rope=list(AXES))
    if args.model:
        return Path(args.model)
    tag = hashlib.sha1(json.dumps([sizes, T5_WIDTH, CLIP_WIDTH, TEXT_LAYERS]).encode()).hexdigest()[:8]
    out = Path(tempfile.gettempdir()) / f"hcp_bench_flux_{tag}"
    if (out / "model_index.json").is_file():
        return out
    t0 = time.perf_counter()
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    build_demo_flux_model(partial, clip_hidden=CLIP_WIDTH, t5_d_model=T5_WIDTH, text_layers=TEXT_LAYERS,
                          transformer_sizes=sizes)
    try:
        partial.rename(out)
    except OSError:  # built meanwhile by another run
        shutil.rmtree(partial, ignore_errors=True)
    print(f"built {out} in {time.perf_counter() - t0:.0f}s")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where every variant trains (auto: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, the same for every variant (default 1: on a shared machine multi-threaded "
                             "steps stall whenever another job takes a core, which swamps the comparison)")
    parser.add_argument("--variants", default="hcp,hcp-text",
                        help="what runs next to minimal: hcp (cache_text on), hcp-text (off), minimal-b (the noise floor)")
    parser.add_argument("--heads", type=int, default=HEADS, help=f"transformer heads of {HEAD_DIM} (FLUX: 24)")
    parser.add_argument("--joint-blocks", type=int, default=JOINT_BLOCKS, help="double-stream blocks (FLUX: 19)")
    parser.add_argument("--single-blocks", type=int, default=SINGLE_BLOCKS, help="single-stream blocks (FLUX: 38)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels, a multiple of 16")
    parser.add_argument("--t5-tokens", type=int, default=128, help="T5 max_sequence_length (FLUX-dev: 512)")
    parser.add_argument("--images", type=int, default=4, help="distinct images (they repeat)")
    parser.add_argument("--model", default=None, help="an existing FLUX folder (default: built under the temp dir)")
    parser.add_argument("--profile", action="store_true", help="cProfile every worker's steps and print the top functions")
    parser.add_argument("--seed", type=int, default=0)
    # Worker-only options (the parent passes them).
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 4 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (VAE factor 8 x 2x2 packing)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    from _sd15_arch import write_images

    variants = parse_variants(args.variants, VARIANTS)
    t0 = time.perf_counter()
    args.model = str(ensure_model(args))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} torch threads"
    print(f"model: {args.model} (FLUX.1-dev layout: {args.joint_blocks} joint + {args.single_blocks} single blocks, "
          f"{args.heads} heads x {HEAD_DIM}, RoPE {AXES}, T5 {T5_WIDTH} / CLIP {CLIP_WIDTH} wide, {TEXT_LAYERS} layer "
          f"each, random weights)")
    print(f"{args.images} images {args.size}x{args.size}, {args.t5_tokens} T5 tokens, batch 1, fp32, LoRA rank "
          f"{LORA_RANK} on attn to_q/k/v/out.0, {args.device} ({where}), {args.warmup} warm-up + {args.steps} timed "
          f"steps, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="hcp_bench_flux_") as tmp:
        work = Path(tmp)
        data = work / "data"
        write_images(data, args.images, size=args.size, seed=args.seed)
        print(f"{', '.join(variants)}: processes start and load, then step in turns", flush=True)
        workers = run_lock_step(variants, args, work, data)
        print()
        print("\n".join(summarise(workers, args)))
        print(f"\n(total {time.perf_counter() - t0:.0f}s, load average now {os.getloadavg()[0]:.2f})")
        if args.profile:
            print_profiles(workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
