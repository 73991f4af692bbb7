"""Benchmark: hcp's training step against a minimal hand-written PyTorch LoRA loop, on the CPU.

    python bench/bench_train.py                 # 1 warm-up + 9 timed steps per variant
    python bench/bench_train.py --quick         # a smoke run: 1 warm-up + 3 timed steps
    python bench/bench_train.py --steps 18 --threads 1 --profile
    python bench/bench_train.py --variants hcp  # only minimal vs hcp (no latent cache)
    python bench/bench_train.py --variants minimal-b,hcp   # with an A/A control: minimal twice
    python bench/bench_train.py --variants hcp,hcp-fp32,hcp-bf16   # defaults (auto) vs fp32 vs bf16

Both sides train the same model on the same data: an SD 1.5-architecture diffusers folder with
random weights (see ``_sd15_arch.py``: diffusers' default UNet with ``cross_attention_dim=768``,
SD's VAE, a 2-layer CLIP text encoder of SD's width), a few 256x256 PNG images with .txt
captions, batch 1, LoRA rank 4 / alpha 4 on to_q, to_k, to_v and to_out.0 of every attn1/attn2,
AdamW (lr 1e-4, weight decay 0.01), fp32 on the CPU.

* ``minimal``: freeze everything, wrap those Linear layers in a tiny LoRA module, then per step
  load the image -> VAE encode (sample) -> noise + timestep -> text encode -> UNet -> MSE ->
  backward -> AdamW step. No framework.
* ``hcp``: ``hcp_core.load_config`` + ``build_run()`` + ``train()`` on an equivalent
  pipeline TOML (``[[lora_unet]] layers = ['re:.*\\.attn.?$']``, fixed 256x256 bucket), with
  ``train.max_grad_norm = 0`` because the minimal loop does not clip.
* ``hcp-cached``: the same with ``cache_latents = true``: the VAE encodes each image once in
  ``setup()`` (not timed) and the steps read the cached latent distribution, skipping the VAE.
* ``hcp-fp32`` / ``hcp-bf16``: ``hcp`` with ``mixed_precision = "no"`` / ``"bf16"`` (``hcp`` itself
  runs the default ``"auto"``, fp32 on a CPU): bf16 autocast against fp32 on this machine's CPU,
  which is much faster on some processors and much slower on others (docs/training.md).

Timing runs in lock step, so that a busy machine (other jobs on the cores) slows every variant
alike: each variant lives in its own process (so its peak memory is its own), and the parent
lets one process at a time run exactly one step, round after round, rotating who goes first.
Step time is measured inside each process from "go" to the end of its optimizer step (for hcp,
a stand-in for ``trainer.lr_scheduler`` whose ``step`` stops the clock, so everything
``train`` does per step is counted). The first ``--warmup`` rounds are dropped (the
first step also pages the memory-mapped weights in). Reported: median wall and CPU seconds per
step (CPU time of the process, all threads: less disturbed by other jobs than wall time), minor
page faults per step, the ratio of medians and the median of the per-round ratios (each step
over the minimal loop's step of the same round), and where the wall time goes (``PARTS``, marked
in hcp through instance attributes and a forward hook on the UNet, never by editing hcp).

Memory: ``ru_maxrss`` of each process at the end (model loading included), the RSS just before
the first step, and the peak RSS during the steps (VmHWM after resetting it through
``/proc/self/clear_refs``, where the kernel allows it). diffusers and transformers memory-map
the safetensors weights, so RSS counts the model's file pages as they are touched (the
processes share those pages in the page cache; every variant loads the same way).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Lines of the parent <-> worker protocol start with this (libraries may print other lines).
TAG = "@@bench "
LORA_RANK = 4
LORA_ALPHA = 4.0
LR = 1e-4
WEIGHT_DECAY = 1e-2
#: The attention blocks whose projections get LoRA (hcp's ``re:.*\.attn.?$`` in the SD UNet).
ATTN_PATTERN = re.compile(r".*\.attn[12]$")
ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
#: "minimal-b" is a second, identical minimal loop: its ratio to "minimal" is the noise floor
#: (two processes doing the same work differ by that much on this machine).
VARIANTS = ("minimal", "hcp", "hcp-cached", "minimal-b", "hcp-fp32", "hcp-bf16")
#: ``model.mixed_precision`` of each hcp variant: "hcp" runs the defaults ("auto": fp32 on a CPU).
PRECISION = {"hcp-fp32": "no", "hcp-bf16": "bf16"}
#: Ratio lines printed when both variants ran: (numerator, denominator).
PAIRS = (("hcp-bf16", "hcp-fp32"), ("hcp-bf16", "hcp"), ("hcp", "hcp-fp32"))
#: Where a step's wall time goes; each worker marks the end of each part. "noise + text" also
#: holds drawing the noise and timestep, "backward" the loss, "optimizer + rest" hcp's logging.
PARTS = ("image + VAE", "noise + text", "UNet forward", "backward", "optimizer + rest")


# ---------------------------------------------------------------------------- worker side
class Channel:
    """The worker's end of the protocol: tagged JSON lines out, "go" lines in."""

    def send(self, kind: str, **data: Any) -> None:
        sys.stdout.write(TAG + json.dumps({"kind": kind, **data}) + "\n")
        sys.stdout.flush()

    def wait_go(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"worker: expected 'go', got {line!r}")


def current_rss_mib() -> float:
    """Resident memory now (MiB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak of what follows can be read; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> Optional[float]:
    """VmHWM (MiB): the peak RSS since :func:`reset_peak_rss` (or process start)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class StepClock:
    """Runs the lock-step protocol around a training loop and times each step."""

    def __init__(self, channel: Channel, total_steps: int, warmup: int, profile_path: Optional[str]) -> None:
        self.channel = channel
        self.total = total_steps
        self.warmup = warmup
        self.done = 0
        self.start = self.last_mark = self.cpu_start = 0.0
        self.faults_start = 0
        self.parts: Dict[str, float] = {}  # this step's seconds per PARTS entry
        self.rss_before = 0.0
        self.peak_reset = False
        self.profiler = None
        if profile_path:
            import cProfile

            self.profiler = cProfile.Profile()
        self.profile_path = profile_path

    def begin(self, trainable: int) -> None:
        """Report readiness, wait for the first "go", and start the first step's clock."""
        self.rss_before = current_rss_mib()
        self.peak_reset = reset_peak_rss()
        self.channel.send("ready", trainable=trainable, rss_before_mib=self.rss_before)
        self._go()

    def _go(self) -> None:
        self.channel.wait_go()
        if self.profiler is not None and self.done >= self.warmup:
            self.profiler.enable()
        self.start = self.last_mark = time.perf_counter()
        self.cpu_start = time.process_time()
        self.faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.parts = {}

    def mark(self, part: str) -> None:
        """End ``part`` (one of PARTS): the seconds since the previous mark are charged to it."""
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last_mark
        self.last_mark = now

    def step_done(self, **extra: float) -> None:
        """End of one optimizer step: report its times, then wait for the next "go" (if any)."""
        self.mark(PARTS[-1])
        seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu_start
        if self.profiler is not None:
            self.profiler.disable()
        self.done += 1
        # Page faults: fresh memory the allocator had to map in during the step.
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults_start
        self.channel.send("step", seconds=seconds, cpu_seconds=cpu, faults=faults, parts=self.parts, **extra)
        if self.done < self.total:
            self._go()

    def finish(self) -> None:
        if self.profiler is not None and self.profile_path:
            self.profiler.dump_stats(self.profile_path)
        peak_steps = peak_rss_since_reset_mib() if self.peak_reset else None
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.channel.send("done", maxrss_mib=maxrss, peak_steps_mib=peak_steps, rss_before_mib=self.rss_before)


class LoraLinear(nn.Module):
    """The minimal loop's LoRA: ``base(x) + scale * up(down(x))``, ``up`` starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def wrap_attention_lora(unet: Any, rank: int, alpha: float, device: Any = None) -> List[Any]:
    """Replace the attention projections (ATTN_PATTERN x ATTN_PROJECTIONS) of ``unet`` with
    :class:`LoraLinear` wrappers (factors in fp32 on ``device``); returns the LoRA parameters."""
    params: List[Any] = []
    for name, module in list(unet.named_modules()):
        if not ATTN_PATTERN.match(name):
            continue
        for proj in ATTN_PROJECTIONS:
            parent_name, _, child = proj.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            wrapped = LoraLinear(module.get_submodule(proj), rank, alpha)
            if device is not None:
                wrapped.down.to(device)
                wrapped.up.to(device)
            setattr(parent, child, wrapped)  # for "to_out.0" this replaces the ModuleList's item 0
            params += [wrapped.down.weight, wrapped.up.weight]
    return params


def minimal_worker(args: argparse.Namespace, clock: StepClock) -> None:
    """The hand-written loop: diffusers/transformers only."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    model = args.model
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.eval()
    text_encoder.eval()

    torch.manual_seed(args.seed)
    lora_params = wrap_attention_lora(unet, LORA_RANK, LORA_ALPHA)
    unet.train()
    optimizer = torch.optim.AdamW(lora_params, lr=LR, weight_decay=WEIGHT_DECAY)

    images = sorted(Path(args.data).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    scaling = vae.config.scaling_factor

    clock.begin(trainable=sum(p.numel() for p in lora_params))
    for step in range(args.total_steps):
        i = step % len(images)
        with torch.no_grad():
            arr = np.asarray(Image.open(images[i]).convert("RGB"), dtype=np.uint8)
            # Contiguous NCHW, as hcp's loader gives (a permuted view would reach the VAE channels-last).
            pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None].float() / 127.5 - 1.0
            latents = vae.encode(pixels).latent_dist.sample() * scaling
            clock.mark(PARTS[0])
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            ids = tokenizer(captions[i], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids).last_hidden_state
            clock.mark(PARTS[1])
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        clock.mark(PARTS[2])
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        clock.mark(PARTS[3])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(loss=float(loss.detach()))
    clock.finish()


def pipeline_toml(model: str, data: str, exp_dir: str, *, steps: int, cached: bool, seed: int,
                  precision: str = "auto") -> str:
    """The hcp pipeline equivalent to the minimal loop (paths written as JSON strings, valid TOML);
    ``precision`` is ``model.mixed_precision``."""
    return f"""
seed = {seed}
exp_dir = {json.dumps(exp_dir)}

[model]
pretrained = {json.dumps(model)}
mixed_precision = "{precision}"

[train]
max_steps = {steps}
save_every = 0
log_every = 1000
max_grad_norm = 0
optimizer = {{ type = "adamw", weight_decay = {WEIGHT_DECAY} }}
scheduler = {{ type = "constant" }}

[data.bench]
batch_size = 1
cache_latents = {"true" if cached else "false"}
bucket = {{ type = "fixed", target_size = [256, 256] }}

[[data.bench.sources]]
type = "image_folder"
img_root = {json.dumps(data)}

[[lora_unet]]
lr = {LR}
rank = {LORA_RANK}
alpha = {LORA_ALPHA}
layers = ['re:.*\\.attn.?$']
"""


class TimedScheduler:
    """Stands in for the trainer's LR scheduler: its ``step`` (the last call of an optimizer step)
    also ends the step's clock; everything else goes to the real scheduler. A proxy rather than a
    patched method, because checkpoints pickle the scheduler's ``__dict__``."""

    def __init__(self, inner: Any, clock: StepClock) -> None:
        self.inner = inner
        self.clock = clock

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.inner.step(*args, **kwargs)
        self.clock.step_done()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def after(fn: Callable[..., Any], clock: StepClock, part: str) -> Callable[..., Any]:
    """``fn`` that marks the end of ``part`` when it returns."""
    def timed(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        clock.mark(part)
        return out

    return timed


def time_hcp_parts(run: Any, clock: StepClock) -> Any:
    """Mark the ends of PARTS inside ``loop.train``; returns the run with timed parts."""
    import attrs
    from hcp_core.train import loop

    # The step starts with the previous step's zero_grad/logging and next_batches; then latents_of.
    loop.latents_of = after(loop.latents_of, clock, PARTS[0])
    run.models.unet.register_forward_hook(lambda *_: clock.mark(PARTS[2]))
    run.accelerator.backward = after(run.accelerator.backward, clock, PARTS[3])
    return attrs.evolve(run, prompt_encoder=after(run.prompt_encoder, clock, PARTS[1]),
                        lr_scheduler=TimedScheduler(run.lr_scheduler, clock))


def hcp_worker(args: argparse.Namespace, clock: StepClock) -> None:
    """hcp's own run on the equivalent pipeline, timed from the outside (``time_hcp_parts``)."""
    import hcp_core
    from hcp_core.train.runner import build_run, train

    exp_dir = Path(args.work) / f"exp-{args.worker}"
    toml = Path(args.work) / f"{args.worker}.toml"
    toml.write_text(pipeline_toml(args.model, args.data, str(exp_dir), steps=args.total_steps,
                                  cached=args.worker == "hcp-cached", seed=args.seed,
                                  precision=PRECISION.get(args.worker, "auto")))
    run = time_hcp_parts(build_run(hcp_core.load_config(toml), overwrite=True), clock)
    clock.begin(trainable=sum(p.numel() for p in run.trained_params))
    try:
        train(run)
    finally:
        run.close()
    clock.finish()


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    clock = StepClock(Channel(), args.total_steps, args.warmup, args.profile_out)
    (minimal_worker if args.worker.startswith("minimal") else hcp_worker)(args, clock)


# ---------------------------------------------------------------------------- parent side
class Worker:
    """One variant's process, driven step by step."""

    def __init__(self, variant: str, args: argparse.Namespace, work: Path, data: Path) -> None:
        self.variant = variant
        self.log_path = work / f"{variant}.log"
        self.profile_path = work / f"{variant}.prof" if args.profile else None
        cmd = [sys.executable, __file__, "--worker", variant, "--model", str(args.model), "--data", str(data),
               "--work", str(work), "--total-steps", str(args.warmup + args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--seed", str(args.seed)]
        if self.profile_path:
            cmd += ["--profile-out", str(self.profile_path)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.steps: List[float] = []  # wall seconds
        self.cpu_steps: List[float] = []  # CPU seconds of the process (all its threads)
        self.fault_steps: List[int] = []  # minor page faults
        self.part_steps: List[Dict[str, float]] = []  # seconds of each of PARTS, per step
        self.info: Dict[str, Any] = {}

    def receive(self, kind: str) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.log.flush()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.variant} worker exited ({self.proc.returncode}) waiting for {kind!r}:\n{tail}")
            if line.startswith(TAG):
                msg = json.loads(line[len(TAG):])
                if msg["kind"] != kind:
                    raise RuntimeError(f"{self.variant}: expected {kind!r}, got {msg}")
                return msg

    def step(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        msg = self.receive("step")
        self.steps.append(float(msg["seconds"]))
        self.cpu_steps.append(float(msg["cpu_seconds"]))
        self.fault_steps.append(int(msg["faults"]))
        self.part_steps.append({k: float(v) for k, v in msg["parts"].items()})
        return self.steps[-1]

    def close(self) -> None:
        self.info.update(self.receive("done"))
        self.proc.wait(timeout=300)
        self.log.close()


def run_lock_step(variants: Sequence[str], args: argparse.Namespace, work: Path, data: Path,
                  worker: Callable[..., Any] = None) -> List[Any]:
    """Start every variant's process (``worker(variant, args, work, data)``, default :class:`Worker`),
    one after the other (loading in parallel would only contend), then let them take one step
    each in turn, round after round.

    The order rotates every round, so each variant goes first, second, ... equally often.
    """
    make = worker or Worker
    workers: List[Any] = []
    try:
        for v in variants:
            workers.append(make(v, args, work, data))
            workers[-1].info.update(workers[-1].receive("ready"))
        counts = {w.variant: w.info["trainable"] for w in workers}
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the variants train different numbers of parameters: {counts}")
        print(f"  each variant trains {counts[variants[0]]:,} LoRA parameters", flush=True)
        total = args.warmup + args.steps
        for i in range(total):
            shift = i % len(workers)
            order = workers[shift:] + workers[:shift]
            times = {w.variant: w.step() for w in order}
            print(f"  round {i + 1}/{total}" + (" (warm-up)" if i < args.warmup else "") + ": "
                  + ", ".join(f"{v} {s:.3f}s" for v, s in times.items()), flush=True)
        for w in workers:
            w.close()
    except BaseException:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
            w.log.close()
        raise
    return workers


def summarise(workers: List[Worker], warmup: int) -> List[str]:
    """The results table and the ratio lines (wall time, and CPU time, which other jobs disturb less)."""
    lines = [f"{'variant':<12}{'wall s/step':>12}{'min':>8}{'max':>8}{'CPU s/step':>12}{'faults/step':>12}{'steps':>7}"
             f"{'peak RSS MiB':>14}{'RSS at step 1':>15}{'peak in steps':>15}"]
    for w in workers:
        timed = w.steps[warmup:]
        peak_steps = w.info.get("peak_steps_mib")
        lines.append(
            f"{w.variant:<12}{statistics.median(timed):>12.3f}{min(timed):>8.3f}{max(timed):>8.3f}"
            f"{statistics.median(w.cpu_steps[warmup:]):>12.3f}{statistics.median(w.fault_steps[warmup:]):>12.0f}{len(timed):>7}"
            f"{w.info['maxrss_mib']:>14.0f}{w.info['rss_before_mib']:>15.0f}"
            + (f"{peak_steps:>15.0f}" if peak_steps else f"{'n/a':>15}")
        )
    base = next(w for w in workers if w.variant == "minimal")
    lines.append("(medians over the timed steps; wall and CPU seconds per optimizer step)")
    lines.append("")
    lines.append(f"{'median wall s':<18}" + "".join(f"{w.variant:>12}" for w in workers))
    for part in PARTS:
        lines.append(f"{part:<18}" + "".join(
            f"{statistics.median(p.get(part, 0.0) for p in w.part_steps[warmup:]):>12.3f}" for w in workers))
    lines.append("")
    for w in workers:
        if w is base:
            continue
        for label, mine, theirs in (("step time", w.steps, base.steps), ("CPU time", w.cpu_steps, base.cpu_steps)):
            a, b = mine[warmup:], theirs[warmup:]
            ratio = statistics.median(a) / statistics.median(b)
            paired = statistics.median(x / y for x, y in zip(a, b))
            lines.append(f"{w.variant}/minimal {label}: {ratio:.3f}x (median of per-round ratios {paired:.3f}x)")
    by_name = {w.variant: w for w in workers}
    for top, bottom in PAIRS:  # e.g. bf16 autocast against fp32 on this CPU, measured in the same rounds
        if top in by_name and bottom in by_name:
            a, b = by_name[top].steps[warmup:], by_name[bottom].steps[warmup:]
            lines.append(f"{top}/{bottom} step time: {statistics.median(a) / statistics.median(b):.3f}x "
                         f"(median of per-round ratios {statistics.median(x / y for x, y in zip(a, b)):.3f}x)")
    return lines


def print_profiles(workers: List[Worker], top: int = 25) -> None:
    import pstats

    for w in workers:
        if w.profile_path and w.profile_path.exists():
            print(f"\n--- cProfile of {w.variant}'s timed steps, by internal time ---")
            pstats.Stats(str(w.profile_path)).sort_stats("tottime").print_stats(top)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 9; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 1)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, the same for every variant")
    parser.add_argument("--images", type=int, default=4, help="distinct images (they repeat across epochs)")
    parser.add_argument("--model", default=None, help="the model folder (built if missing; default /tmp/hcp_bench_sd15)")
    parser.add_argument("--variants", default="hcp,hcp-cached",
                        help="what runs next to minimal: hcp, hcp-cached, minimal-b (an identical minimal loop: the noise floor), "
                             "hcp-fp32, hcp-bf16 (hcp with mixed_precision \"no\" / \"bf16\")")
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
        args.steps = 3 if args.quick else 9
    if args.warmup is None:
        args.warmup = 1
    return args


def parse_variants(text: str, choices: Sequence[str]) -> List[str]:
    """``"minimal"`` (the baseline, ``choices[0]``) plus the comma-separated ``--variants``."""
    variants = [choices[0]] + [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants[1:] if v not in choices[1:]]
    if unknown or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: unknown or repeated {variants[1:]}; choose from {', '.join(choices[1:])}")
    return variants


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    from _sd15_arch import DEFAULT_MODEL_DIR, TEXT_LAYERS, ensure_model, write_images

    variants = parse_variants(args.variants, VARIANTS)
    t0 = time.perf_counter()
    args.model = str(ensure_model(Path(args.model) if args.model else DEFAULT_MODEL_DIR))
    print(f"model: {args.model} (SD 1.5 UNet + VAE, {TEXT_LAYERS}-layer CLIP text encoder, random weights)")
    print(f"{args.images} images 256x256, batch 1, LoRA rank {LORA_RANK} alpha {LORA_ALPHA} on attn1/attn2 "
          f"to_q/k/v/out.0, {args.threads} torch threads, {args.warmup} warm-up + {args.steps} timed steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="hcp_bench_train_") as tmp:
        work = Path(tmp)
        data = work / "data"
        write_images(data, args.images, seed=args.seed)
        print(f"{', '.join(variants)}: processes start and load, then step in turns", flush=True)
        workers = run_lock_step(variants, args, work, data)
        print()
        print("\n".join(summarise(workers, args.warmup)))
        print(f"\n(total {time.perf_counter() - t0:.0f}s, load average now {os.getloadavg()[0]:.2f})")
        if args.profile:
            print_profiles(workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
