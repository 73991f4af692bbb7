"""Benchmark on one GPU: hcp's SD 1.5 LoRA training step against a minimal hand-written loop.

    python bench/bench_gpu.py --json $OUT/bench_gpu.json     # the full setting on a CUDA GPU (~3-5 min)
    python bench/bench_gpu.py --variants hcp,hcp-cached      # without the minimal loop
    python bench/bench_gpu.py --tiny --device cpu --steps 3 --warmup 1   # a smoke run of the script (CPU, < 1 min)
    python bench/bench_gpu.py --variant-timeout 300 --deadline 520 --json $OUT/b.json   # on a leased machine
    bash bench/gpu_checks.sh 545      # the prepared run for a leased GPU: preflight, then the above
    python bench/bench_gpu.py --narrow --precision bf16 --count-ops   # operations per step, on a CPU (~2 min)
    python bench/bench_gpu.py --profile 3 ...  # + 3 untimed steps under torch.profiler: GPU busy share, launches

The setting (issue "Speed on the GPU", its reference table):

* model: an SD 1.5-architecture diffusers folder with random weights, written offline by
  ``_sd15_arch.py`` (diffusers' default ``UNet2DConditionModel``, ~860M parameters, with
  ``cross_attention_dim=768``; SD's VAE; a **12-layer** CLIP text encoder of CLIP-L's width; hcp's
  demo tokenizer), built once under the temp dir (about 4 GB; ~1 min the first time);
* data: 32 synthetic 512x512 PNG images with captions, batch 4, a fixed 512x512 bucket;
* LoRA rank 16 / alpha 16 on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every ``attn1``/``attn2``
  (both sides train the same 3.2M parameters), AdamW lr 1e-4 (weight decay 0.01);
* bf16 mixed precision (frozen UNet and text-encoder weights in bf16, the LoRA weights in fp32; the
  VAE in fp32 in the minimal loop, in bf16 in hcp by its ``vae_dtype = "auto"``), diffusers' default
  SDPA attention processor, no gradient checkpointing;
* 60 steps, the mean step time of the last 40 (``--steps`` total, ``--warmup`` dropped).

Variants, each in a fresh subprocess, one after another, each with the same fixed seed:

* ``minimal``: a hand-written loop with no framework (bench_train.py's ``LoraLinear`` and layer
  selection, imported): load 4 images -> VAE encode (fp32, sampled) -> noise + timesteps -> text
  encoder -> UNet under bf16 autocast -> MSE -> backward -> ``torch.optim.AdamW`` step;
* ``example``: the same loop made like diffusers' ``train_text_to_image_lora.py`` under bf16, the
  issue's reference (22 images/s on its H100): peft's LoRA with bf16 factors, a bf16 VAE,
  gradient-norm clipping at 1.0 (needs peft). The summary gives hcp's images/s as ratios to it:
  the issue's targets are >= 1x for the defaults and >= 2x for the long-run variant;
* ``hcp``: ``build_run(load_config(toml))`` + ``train(run)`` on the equivalent pipeline with hcp's
  defaults (``mixed_precision = "auto"``, i.e. bf16 on a GPU that has it; ``vae_dtype = "auto"``,
  i.e. a bf16 VAE there (the minimal loop keeps it fp32); fused
  AdamW; ``max_grad_norm = 1.0`` clipping, which the minimal loop does not do; ``num_workers =
  "auto"``, i.e. up to 4 DataLoader workers on a GPU, or ``--workers N``);
* ``hcp-cached``: the same with ``cache_latents = true`` (the VAE encodes each image once during
  set-up; the steps skip it).
* ``hcp-compile``: defaults plus ``model.compile = true`` (inductor, ``dynamic = "auto"``: one
  specialised graph for the one bucket; ``--compile`` sets another value); its launch to first
  step includes compiling, its s/step is the compiled step (the first steps are dropped);
* ``hcp-cached-compile``: cached latents + ``model.cache_text = true`` (every caption encoded
  once; the text encoder leaves the GPU) + ``model.compile``, what a user switches on for a long
  run (the issue's >= 44 images/s target);
* ``hcp-cached-cudagraphs``: the same with ``model.compile = { mode = "reduce-overhead" }``: the
  compiled graphs replay as CUDA graphs (one launch for a whole graph: the step is launch-bound
  at batch 4); inductor's cache makes its compile shorter when it follows ``hcp-cached-compile``.
  On a CPU smoke run (``--tiny``) the compile variants use dynamo's ``eager`` backend (no C++
  code generation): a check of the wiring, not a speed.
* ``hcp-cudnn-benchmark`` and ``hcp-channels-last``: experiments on ``hcp`` that hcp does not offer
  as options (yet), each one change made in the bench's process: ``torch.backends.cudnn.benchmark
  = True`` (cuDNN times its convolution algorithms for each new shape), or the UNet's frozen conv
  weights in channels-last memory format (its convolutions then run NHWC; the issue's probe listed
  "channels-last 0.153 s"; on CUDA, GroupNorm converts such inputs back at each call).

Reported per variant: mean seconds per step over the timed steps, images/s (batch / s/step),
launch-to-first-step seconds (from starting the process to the end of its first optimizer step:
imports, model loading, hcp's set-up including the latent cache, and the first step's CUDA
warm-up), and peak GPU memory (``torch.cuda.max_memory_allocated`` over the whole process, and
during the steps alone). Step time is the time between the ends of consecutive optimizer steps
(CUDA synchronised there), so everything either loop does per step counts (for hcp, a stand-in for
its LR scheduler marks the end of a step). On a CPU (``--tiny``) memory is the process's peak RSS.

Where the time goes, for a step that is bound by kernel launches rather than arithmetic (batch 4
is, on an H100): ``--count-ops`` counts the tensor operations each step dispatches (views left
out; on a GPU about one kernel each), exactly, on any device; ``--narrow`` gives the SD 1.5 layout
at a few dozen channels, so that a CPU counts the full model's operations in seconds, and
``--precision bf16`` makes a CPU run dispatch what a bf16 GPU run does (casts included).
``--profile K`` runs K more steps under torch.profiler, not timed: the share of the wall time the
GPU was busy, kernel launches per step, and the costliest kernels and host operations.

Then a markdown table and a one-line summary: hcp/minimal ratios and the issue's throughput targets
(>= 22 images/s for hcp's defaults; >= 44 images/s for cached latents + ``torch.compile``). ``--json PATH`` also writes everything (per-step times included)
as JSON, and each variant's log next to it.

Needs only this repository (on ``PYTHONPATH`` or installed) and torch, diffusers, transformers,
accelerate (and their own dependencies: numpy, Pillow, tokenizers, safetensors); nothing is downloaded.
Without an installed hcp (no ``hcp`` entry points, just the checkout on ``PYTHONPATH``) the hcp
variants load the built-in plugins from ``plugins/`` themselves. CPU runs use one torch thread per
process (a smoke test on a shared machine, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from bench_train import TimedScheduler, wrap_attention_lora  # noqa: E402

LORA_RANK = 16
LORA_ALPHA = 16.0
LR = 1e-4
WEIGHT_DECAY = 1e-2  # torch's AdamW default, and hcp's
TEXT_LAYERS = 12
VARIANTS = ("minimal", "hcp", "hcp-cached", "hcp-compile", "hcp-cached-compile", "hcp-cached-cudagraphs", "example",
            "hcp-cudnn-benchmark", "hcp-channels-last")
#: Experiments on hcp's defaults that hcp itself does not offer (yet): each changes one thing in the
#: bench's own process, so that a GPU run shows whether it should become an option or a default.
EXPERIMENTS = ("hcp-cudnn-benchmark", "hcp-channels-last")
#: The variants with the options a user switches on for a long run (cached latents and text +
#: torch.compile, without and with CUDA graphs).
LONG_RUNS = ("hcp-cached-compile", "hcp-cached-cudagraphs")
#: The issue's throughput targets on an H100 (images/s).
TARGET_DEFAULTS = 22.0
TARGET_CACHED_COMPILE = 44.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- worker side
class Recorder:
    """Times the steps of one worker: each step ends at an optimizer step (CUDA synchronised)."""

    def __init__(self, device: torch.device, launch_time: float) -> None:
        self.device = device
        self.launch_time = launch_time
        self.steps: List[float] = []
        self.info: Dict[str, Any] = {}
        self.last = 0.0
        #: With ``--count-ops``: the counter, and per step {op name: calls} (kernels, not views).
        self.ops: Optional["OpCounter"] = None
        self.op_steps: List[Dict[str, int]] = []
        #: With ``--profile K``: torch.profiler records the steps after ``profile_after`` up to
        #: ``profile_until`` (the run's last K steps; they are left out of the timing).
        self.profile_after: Optional[int] = None
        self.profile_until = 0
        self.profile_start = 0
        self.profiler: Any = None

    def begin(self, trainable: int, **info: Any) -> None:
        """Set-up is over: the first step starts now."""
        sync(self.device)
        self.info.update(info, trainable=trainable, ready_s=time.time() - self.launch_time)
        if self.device.type == "cuda":
            self.info["gpu_setup_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.info["gpu_at_step1_mib"] = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.ops is not None:
            self.ops.take()  # set-up's ops are not a step's
        self.last = time.perf_counter()

    def step_done(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now
        if self.ops is not None:
            self.op_steps.append(self.ops.take())
        if self.profile_after is not None and len(self.steps) == self.profile_after:
            self.profiler = start_profiler(self.device)
            self.profile_start = len(self.steps)
        elif self.profiler is not None and len(self.steps) == self.profile_until:
            self.finish_profile()
        if len(self.steps) == 1:
            self.info["first_step_s"] = time.time() - self.launch_time

    def finish_profile(self) -> None:
        """Stop the profiler (after the last step, before the run's final save) and summarise it."""
        if self.profiler is None:
            return
        prof, self.profiler = self.profiler, None
        try:  # a failed summary must not cost the variant its timings
            prof.stop()
            wall = sum(self.steps[self.profile_start:])
            self.info["profile"] = profile_summary(prof, len(self.steps) - self.profile_start, wall)
        except Exception as exc:
            self.info["profile"] = {"error": f"{type(exc).__name__}: {exc}"}

    def result(self) -> Dict[str, Any]:
        self.finish_profile()
        out = dict(self.info, step_seconds=self.steps,
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if self.op_steps:
            out["op_steps"] = self.op_steps
        if self.device.type == "cuda":
            steps_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["gpu_peak_steps_mib"] = steps_peak
            out["gpu_peak_mib"] = max(steps_peak, out.get("gpu_setup_peak_mib", 0.0))
        return out


class OpCounter:
    """Counts the tensor operations this process dispatches (``--count-ops``), views and scalar reads left out.

    On a GPU each counted operation is (about) one kernel launch, and at batch 4 the step is bound
    by launches, not arithmetic; so the count per step, which a CPU run measures exactly, shows
    where a step spends launches that another loop does not. Backward's operations count too (the
    autograd engine carries the mode to its threads)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: Dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                # Views launch nothing; a scalar read (.item()) is a copy to the host, not a kernel.
                if not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
                    name = func.overloadpacket.__name__
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.counts = counts
        self.mode = Mode()

    def take(self) -> Dict[str, int]:
        """The counts since the last call (and start again)."""
        out = dict(self.counts)
        self.counts.clear()
        return out


def start_profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def _busy_seconds(intervals: List[Tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e6


def profile_summary(prof: Any, steps: int, wall: float, top: int = 12) -> Dict[str, Any]:
    """What a few profiled steps spent: the share of the wall time the GPU was busy (kernels and
    copies, overlaps merged), kernel launches per step, and the operations and kernels that took
    the most time (milliseconds per step)."""
    from torch.autograd import DeviceType

    events = prof.events()
    gpu = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name)
    averages = prof.key_averages()

    def ms(evt: Any, *names: str) -> float:
        for name in names:  # torch renamed cuda_* to device_* (2.4+)
            if hasattr(evt, name):
                return getattr(evt, name) / 1e3 / steps
        return 0.0

    host = sorted(((ms(e, "self_cpu_time_total"), e.key, e.count // steps) for e in averages
                   if e.device_type == DeviceType.CPU), reverse=True)[:top]
    kernels = sorted(((ms(e, "self_device_time_total", "self_cuda_time_total"), e.key, e.count // steps)
                      for e in averages if e.device_type == DeviceType.CUDA), reverse=True)[:top]
    out: Dict[str, Any] = {"steps": steps, "wall_s_per_step": wall / steps,
                           "top_host_self_ms": [[round(t, 3), k, n] for t, k, n in host]}
    if gpu:
        out["launches_per_step"] = launches / steps
        out["gpu_busy_s_per_step"] = _busy_seconds(gpu) / steps
        out["gpu_busy_share"] = out["gpu_busy_s_per_step"] / out["wall_s_per_step"]
        out["top_kernels_ms"] = [[round(t, 3), k[:120], n] for t, k, n in kernels]
    return out


def attention_processors(unet: Any) -> List[str]:
    """The attention processor classes the UNet uses (SDPA: ``AttnProcessor2_0``)."""
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


def half_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The minimal loop's mixed precision, as hcp's "auto" picks it: bf16 on a GPU that has it,
    fp16 on an older one, fp32 on the CPU; ``precision`` "bf16" or "fp32" (``--precision``) forces one."""
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def minimal_worker(args: argparse.Namespace, rec: Recorder, device: torch.device, *, example: bool = False) -> None:
    """The hand-written loop: diffusers/transformers only, bf16 autocast, fp32 VAE and LoRA.

    ``example``: made like diffusers' ``train_text_to_image_lora.py`` under bf16 instead (the issue's
    reference): peft's LoRA (``unet.add_adapter``, gaussian init) with its factors in bf16 like the
    frozen UNet, the VAE in bf16, gradient-norm clipping at 1.0."""
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
    half = half_dtype(device, args.precision)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.to(device, dtype=half or torch.float32)
    text_encoder.to(device, dtype=half or torch.float32)
    vae.to(device, dtype=(half or torch.float32) if example else torch.float32)
    vae.eval()
    text_encoder.eval()

    torch.manual_seed(args.seed)
    if example:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        lora_params = [p for p in unet.parameters() if p.requires_grad]  # in the UNet's dtype
    else:
        lora_params = wrap_attention_lora(unet, LORA_RANK, LORA_ALPHA, device)  # fp32 factors
    unet.train()
    # foreach: what torch picks on a GPU anyway; said so that a CPU op count (--count-ops) compares alike.
    optimizer = torch.optim.AdamW(lora_params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)

    images = sorted(Path(args.data).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    scaling = vae.config.scaling_factor
    order = torch.Generator().manual_seed(args.seed)
    perm: List[int] = []
    autocast = torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)

    rec.begin(trainable=sum(p.numel() for p in lora_params), precision=str(half).replace("torch.", "") if half else "fp32",
              attention=attention_processors(unet))
    for _ in range(args.total_steps):
        if len(perm) < args.batch:  # a fresh shuffle each epoch (32 images / batch 4: 8 steps)
            perm = torch.randperm(len(images), generator=order).tolist()
        picked, perm = perm[:args.batch], perm[args.batch:]
        with torch.no_grad():
            arr = np.stack([np.asarray(Image.open(images[i]).convert("RGB"), dtype=np.uint8) for i in picked])
            pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device).float() / 127.5 - 1.0
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample().float() * scaling
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(picked),), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            ids = tokenizer([captions[i] for i in picked], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            with autocast:
                hidden = text_encoder(ids).last_hidden_state
        with autocast:
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if example:
            torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # a training loop reads its loss (and so waits for the step)
        rec.step_done()


def pipeline_toml(args: argparse.Namespace, exp_dir: str, *, cached: bool, compiled: Any = False) -> str:
    """The hcp pipeline of the minimal loop's setting, hcp's defaults otherwise (paths as JSON strings).

    ``compiled``: ``model.compile = true`` (inductor; ``--compile`` sets another value) on a GPU, or
    ``"cudagraphs"``: ``{ mode = "reduce-overhead" }`` (inductor replaying CUDA graphs); on a CPU
    smoke run dynamo's "eager" backend, which checks the wiring without minutes of C++ compilation."""
    precision_line = "" if args.precision == "auto" else \
        f'mixed_precision = "{"no" if args.precision == "fp32" else "bf16"}"'
    compile_line = ""
    if compiled:
        value = '{ mode = "reduce-overhead" }' if compiled == "cudagraphs" else args.compile
        compile_line = f"compile = {value}" if args.device == "cuda" else 'compile = { backend = "eager" }'
    return f"""
seed = {args.seed}
exp_dir = {json.dumps(exp_dir)}

[model]
pretrained = {json.dumps(args.model)}
{precision_line}
{compile_line}
{"cache_text = true" if cached and compiled else ""}

[train]
max_steps = {args.total_steps}

[data.bench]
batch_size = {args.batch}
cache_latents = {"true" if cached else "false"}
{"" if args.workers is None else f"num_workers = {args.workers}"}
bucket = {{ type = "fixed", target_size = [{args.size}, {args.size}] }}

[[data.bench.sources]]
type = "image_folder"
img_root = {json.dumps(args.data)}

[[lora_unet]]
lr = {LR}
rank = {LORA_RANK}
alpha = {LORA_ALPHA}
layers = ['re:.*\\.attn.?$']
"""


def checkout_registry(force: bool = False) -> Any:
    """None when hcp is installed (its plugins are found through the ``hcp`` entry points); with only
    the checkout on ``PYTHONPATH`` (no entry points), a registry of the built-in plugins imported from
    ``plugins/`` under their installed name ``hcp_plugins`` (as setup.py maps them)."""
    import importlib
    import importlib.metadata as md
    import importlib.util
    import re

    # Entry points alone are not enough: a checkout's own hcp.egg-info on PYTHONPATH lists them
    # without hcp_plugins being importable.
    if not force and any(True for _ in md.entry_points(group="hcp")) and importlib.util.find_spec("hcp_plugins"):
        return None
    from hcp_core.plugins import build_registry

    if "hcp_plugins" not in sys.modules:
        try:
            importlib.import_module("hcp_plugins")
        except ImportError:
            spec = importlib.util.spec_from_file_location("hcp_plugins", REPO / "plugins" / "__init__.py",
                                                          submodule_search_locations=[str(REPO / "plugins")])
            module = importlib.util.module_from_spec(spec)
            sys.modules["hcp_plugins"] = module
            spec.loader.exec_module(module)
    section = (REPO / "pyproject.toml").read_text().partition("[project.entry-points.hcp]")[2].partition("\n[")[0]
    names = re.findall(r'^\w+\s*=\s*"(hcp_plugins[\w.]*)"', section, flags=re.M)
    return build_registry(extra_plugins=[importlib.import_module(n) for n in names])


def hcp_worker(args: argparse.Namespace, rec: Recorder, device: torch.device) -> None:
    """hcp's own run (``build_run`` + ``train``); a stand-in LR scheduler marks each step's end."""
    from hcp_core.plugins import using_registry
    from hcp_core.train.runner import build_run, train

    registry = checkout_registry(force=bool(os.environ.get("HCP_BENCH_CHECKOUT_PLUGINS")))
    if registry is not None:
        with using_registry(registry):
            return _hcp_worker(args, rec, device, build_run, train, registry)
    return _hcp_worker(args, rec, device, build_run, train, None)


def _hcp_worker(args: argparse.Namespace, rec: Recorder, device: torch.device, build_run: Any, train: Any,
                registry: Any) -> None:
    import attrs

    import hcp_core

    exp_dir = Path(args.work) / f"exp-{args.worker}"
    toml = Path(args.work) / f"{args.worker}.toml"
    toml.write_text(pipeline_toml(args, str(exp_dir), cached="cached" in args.worker,
                                  compiled="cudagraphs" if args.worker.endswith("cudagraphs")
                                  else args.worker.endswith("compile")))
    if args.worker == "hcp-cudnn-benchmark":  # cuDNN times its algorithms per new shape, keeps the fastest
        torch.backends.cudnn.benchmark = True
    run = build_run(hcp_core.load_config(toml, registry=registry), overwrite=True)
    if run.accelerator.device.type != device.type:
        raise RuntimeError(f"hcp runs on {run.accelerator.device}, the bench asked for {device}")
    if args.worker == "hcp-channels-last":  # frozen conv weights NHWC: convolutions then run channels-last
        for prm in run.models.unet.parameters():
            if not prm.requires_grad and prm.dim() == 4:
                prm.data = prm.data.contiguous(memory_format=torch.channels_last)
    run = attrs.evolve(run, lr_scheduler=TimedScheduler(run.lr_scheduler, rec))
    precision = {"no": "fp32", "bf16": "bfloat16", "fp16": "float16"}.get(run.accelerator.mixed_precision,
                                                                          run.accelerator.mixed_precision)
    rec.begin(trainable=sum(p.numel() for p in run.trained_params), precision=precision,
              attention=attention_processors(run.models.unet))
    try:
        train(run)
    finally:
        run.close()


def run_worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        # One thread: on a shared machine multi-threaded CPU steps stall whenever another job takes a
        # core (see bench_flux.py's --threads); CPU runs here are smoke tests, not measurements.
        torch.set_num_threads(1)
    rec = Recorder(device, args.launch_time)
    if args.profile:
        rec.profile_after, rec.profile_until = args.total_steps - args.profile, args.total_steps
    torch.manual_seed(args.seed)
    if args.count_ops:
        rec.ops = OpCounter()
        rec.ops.mode.__enter__()
    if args.worker in ("minimal", "example"):
        minimal_worker(args, rec, device, example=args.worker == "example")
    else:
        hcp_worker(args, rec, device)
    if rec.ops is not None:
        rec.ops.mode.__exit__(None, None, None)
    Path(args.result).write_text(json.dumps(rec.result()))


# ---------------------------------------------------------------------------- parent side
def run_variant(variant: str, args: argparse.Namespace, work: Path, data: Path,
                timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one variant in a fresh process (stopped after ``timeout`` seconds); its result, or
    ``{"error": ...}`` with the log's tail."""
    log_path = work / f"{variant}.log"
    result_path = work / f"{variant}.result.json"
    launch = time.time()
    cmd = [sys.executable, __file__, "--worker", variant, "--model", str(args.model), "--data", str(data),
           "--work", str(work), "--total-steps", str(args.steps + args.profile), "--seed", str(args.seed), "--device", args.device,
           "--size", str(args.size), "--batch", str(args.batch), "--result", str(result_path),
           "--launch-time", repr(launch), "--compile", args.compile, "--precision", args.precision,
           "--profile", str(args.profile)]
    cmd += [] if args.workers is None else ["--workers", str(args.workers)]
    cmd += ["--count-ops"] if args.count_ops else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # hcp picks CUDA whenever it sees one
    with open(log_path, "w") as log:
        # Its own process group, so that a timeout also stops inductor's compile workers.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            error = f"exit code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, error = None, f"stopped after {timeout:.0f}s (time limit)"
    if args.json:
        shutil.copy(log_path, Path(args.json).with_suffix(f".{variant}.log"))
    if code != 0 or not result_path.is_file():
        return {"error": error, "log_tail": log_path.read_text(errors="replace")[-4000:],
                "wall_s": time.time() - launch}
    result = json.loads(result_path.read_text())
    timed = result["step_seconds"][args.warmup:args.steps]  # profiled steps (--profile) come after
    result["s_per_step"] = sum(timed) / len(timed)
    result["images_per_s"] = args.batch / result["s_per_step"]
    result["timed_steps"] = len(timed)
    if result.get("op_steps"):
        per_step = [sum(c.values()) for c in result["op_steps"][args.warmup:args.steps]]
        result["ops_per_step"] = sorted(per_step)[len(per_step) // 2]
    result["wall_s"] = time.time() - launch
    return result


def profile_lines(prof: Optional[Dict[str, Any]], top: int = 6) -> List[str]:
    """A few lines from a variant's ``--profile`` summary (the JSON holds the rest)."""
    if not prof:
        return []
    if "error" in prof:
        return [f"profile failed: {prof['error']}"]
    head = f"profiled {prof['steps']} steps: {prof['wall_s_per_step'] * 1e3:.1f} ms/step"
    if "gpu_busy_share" in prof:
        head += (f", GPU busy {prof['gpu_busy_s_per_step'] * 1e3:.1f} ms ({100 * prof['gpu_busy_share']:.0f}%), "
                 f"{prof['launches_per_step']:.0f} kernel launches/step")
    lines = [head]
    lines += [f"kernel {t:8.2f} ms  x{n:<5} {k}" for t, k, n in prof.get("top_kernels_ms", [])[:top]]
    lines += [f"host   {t:8.2f} ms  x{n:<5} {k}" for t, k, n in prof["top_host_self_ms"][:top]]
    return lines


def write_json(path: str, setting: Dict[str, Any], results: Dict[str, Dict[str, Any]], **extra: Any) -> None:
    """The setting and every variant's result (per-step times included), written in one go."""
    Path(path).write_text(json.dumps(dict({"setting": setting, "variants": results}, **extra), indent=2) + "\n")


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: Dict[str, Dict[str, Any]], cuda: bool) -> List[str]:
    mem = ("peak GPU MiB", "peak GPU MiB in steps") if cuda else ("peak RSS MiB", "")
    head = ["variant", "precision", "s/step", "images/s", "launch to first step s", mem[0]] + ([mem[1]] if cuda else [])
    counted = any("ops_per_step" in r for r in results.values())
    busy = any("gpu_busy_share" in r.get("profile", {}) for r in results.values())  # profiled on a GPU
    head += (["ops/step"] if counted else []) + (["launches/step", "GPU busy"] if busy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed ({r['error']}) |" + " |" * (len(head) - 2))
            continue
        cells = [name, r.get("precision", "?"), f"{r['s_per_step']:.4f}", f"{r['images_per_s']:.2f}",
                 f"{r['first_step_s']:.1f}"]
        cells += [fmt(r.get("gpu_peak_mib"), ",.0f"), fmt(r.get("gpu_peak_steps_mib"), ",.0f")] if cuda else \
                 [f"{r['peak_rss_mib']:,.0f}"]
        prof = r.get("profile", {})
        cells += [fmt(r.get("ops_per_step"), ",")] if counted else []
        if busy:  # n/a: not profiled, or its profile failed
            share = prof.get("gpu_busy_share")
            cells += [fmt(prof.get("launches_per_step"), ",.0f"), "n/a" if share is None else f"{100 * share:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> str:
    ok = {k: v for k, v in results.items() if "error" not in v}
    parts = []
    base = ok.get("minimal")
    for name in VARIANTS[1:]:
        if base and name in ok:
            parts.append(f"{name}/minimal s/step {ok[name]['s_per_step'] / base['s_per_step']:.3f}x")
    full = args.device == "cuda" and not (args.tiny or args.narrow)
    if "hcp" in ok:
        ips = ok["hcp"]["images_per_s"]
        verdict = ("met" if ips >= TARGET_DEFAULTS else "NOT met") if full else "n/a: not the full setting on a GPU"
        parts.append(f"hcp defaults {ips:.2f} images/s (target >= {TARGET_DEFAULTS:g}: {verdict})")
    for name in ("hcp-cached", "hcp-compile"):
        if name in ok:
            parts.append(f"{name} {ok[name]['images_per_s']:.2f} images/s")
    for name in EXPERIMENTS:  # each against hcp's defaults measured in the same run
        if name in ok and "hcp" in ok:
            parts.append(f"{name}/hcp s/step {ok[name]['s_per_step'] / ok['hcp']['s_per_step']:.3f}x")
    for name in LONG_RUNS:
        if name in ok:
            ips = ok[name]["images_per_s"]
            verdict = ("met" if ips >= TARGET_CACHED_COMPILE else "NOT met") if full else "n/a: not the full setting on a GPU"
            parts.append(f"{name} {ips:.2f} images/s (target >= {TARGET_CACHED_COMPILE:g}: {verdict})")
    example = ok.get("example")
    if example:  # the targets as ratios to the diffusers-example-like loop of the same run
        for name, goal in (("hcp", 1.0), *((n, 2.0) for n in LONG_RUNS)):
            if name in ok:
                ratio = ok[name]["images_per_s"] / example["images_per_s"]
                verdict = ("met" if ratio >= goal else "NOT met") if full else "n/a: not the full setting on a GPU"
                parts.append(f"{name} {ratio:.2f}x the example's images/s (target >= {goal:g}x: {verdict})")
    failed = [k for k in results if k not in ok]
    if failed:
        parts.append(f"FAILED: {', '.join(failed)}")
    return "; ".join(parts)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def prepare_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.tiny:
        from hcp_core.demo.model import build_demo_model

        out = Path(tempfile.gettempdir()) / "hcp_bench_gpu_tiny"
        if not (out / "model_index.json").is_file():
            build_demo_model(out, seed=0)
        return str(out)
    from _sd15_arch import ensure_model

    t0 = time.perf_counter()
    name = f"hcp_bench_sd15_te{TEXT_LAYERS}" + ("_narrow" if args.narrow else "")
    out = ensure_model(Path(tempfile.gettempdir()) / name, text_layers=TEXT_LAYERS, narrow=args.narrow)
    print(f"model folder ready in {time.perf_counter() - t0:.0f}s: {out}", flush=True)
    return str(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant, warm-up included (default 60)")
    parser.add_argument("--warmup", type=int, default=20, help="first steps left out of the mean (default 20)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; --tiny 64)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--images", type=int, default=32, help="synthetic images (default 32)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, run in this order (default {','.join(VARIANTS)})")
    parser.add_argument("--tiny", action="store_true",
                        help="hcp's tiny demo SD model and 64 px images: a smoke test of the script (runs on a CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available; without one the bench exits 0 unless --tiny (then cpu)")
    parser.add_argument("--narrow", action="store_true",
                        help="the SD 1.5 layout at a few dozen channels: a step's operations as on the full model, "
                             "cheap enough to count on a CPU (--count-ops); no speed figure")
    parser.add_argument("--model", default=None, help="an existing SD-layout diffusers folder (default: built offline)")
    parser.add_argument("--json", default=None, help="also write the results here as JSON (and the logs next to it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", default="true",
                        help="the TOML value of model.compile in the compile variants on a GPU (default true; "
                             "e.g. '{ dynamic = false }')")
    parser.add_argument("--workers", type=int, default=None,
                        help="data.*.num_workers of the hcp variants (default: hcp's own default)")
    parser.add_argument("--variant-timeout", type=float, default=None,
                        help="stop a variant after this many seconds and record it as failed (default: no limit)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the bench's start: a variant still running then is stopped, later ones "
                             "are skipped, and the results so far are reported (for a leased machine)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="mixed precision of every variant (default auto: bf16 on a GPU that has it, fp32 on a "
                             "CPU); bf16 on a CPU makes --count-ops count what a GPU step dispatches")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="after the timed steps, K more under torch.profiler (not timed): the share of time the "
                             "GPU is busy, kernel launches per step, the costliest kernels and host operations")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the tensor operations of each step (views left out): on a GPU about one kernel "
                             "launch each, so a CPU run shows a launch-bound step's cost (slows the steps)")
    # Worker-only options (the parent passes them).
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--launch-time", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.tiny or args.narrow else 512
    if args.size % 8:
        parser.error("--size must be a multiple of 8 (the VAE's factor)")
    if not args.worker and not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and below --steps (at least one timed step)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else ("cpu" if args.tiny or args.narrow else None)
        if args.device is None:
            print("bench_gpu: torch sees no CUDA device; nothing to measure (use --tiny --device cpu for a smoke run)")
            return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda, but torch sees no CUDA device; nothing to measure")
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: unknown or repeated in {variants}; choose from {', '.join(VARIANTS)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from _sd15_arch import write_images

    args.model = prepare_model(args)
    setting = {
        "model": "hcp demo tiny SD (--tiny)" if args.tiny else "narrow " * args.narrow +
                 f"SD 1.5 architecture, random weights (UNet ~860M, SD VAE, {TEXT_LAYERS}-layer CLIP-L-width text encoder)",
        "model_path": args.model, "images": args.images, "size": args.size, "batch": args.batch,
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "layers": "attn1/attn2 to_q, to_k, to_v, to_out.0"},
        "optimizer": {"type": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "device": args.device,
        "device_name": device_name(args.device), "torch": torch.__version__, "python": platform.python_version(),
    }
    try:
        import diffusers

        setting["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    print(f"{setting['model']}: {args.images} images {args.size}x{args.size}, batch {args.batch}, LoRA rank {LORA_RANK} "
          f"alpha {LORA_ALPHA:g}, {args.steps} steps (mean of the last {args.steps - args.warmup}), "
          f"{args.device} ({setting['device_name']}), torch {torch.__version__}", flush=True)
    results: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hcp_bench_gpu_") as tmp:
        work = Path(tmp)
        data = work / "data"
        write_images(data, args.images, size=args.size, seed=args.seed)
        for variant in variants:
            limits = [x for x in (args.variant_timeout,
                                  None if args.deadline is None else args.deadline - (time.perf_counter() - t0))
                      if x is not None]
            timeout = min(limits) if limits else None
            if timeout is not None and timeout < 10:
                results[variant] = {"error": "skipped (--deadline reached)"}
                print(f"  {variant}: skipped, --deadline reached", flush=True)
                continue
            print(f"  {variant}: running ...", flush=True)
            r = results[variant] = run_variant(variant, args, work, data, timeout)
            if "error" in r:
                print(f"  {variant}: FAILED ({r['error']}); the end of its log:\n{r['log_tail']}", flush=True)
            else:
                print(f"  {variant}: {r['s_per_step']:.4f} s/step, {r['images_per_s']:.2f} images/s, first step "
                      f"{r['first_step_s']:.1f}s after launch (set-up {r['ready_s']:.1f}s), {r['precision']}, "
                      f"attention {'/'.join(r.get('attention', []))}, {r['trainable']:,} trained parameters "
                      f"({r['wall_s']:.0f}s in all)", flush=True)
                for line in profile_lines(r.get("profile")):
                    print("    " + line, flush=True)
            if args.json:  # what has run so far, in case the machine goes away before the end
                write_json(args.json, setting, results)
    counts = {k: v["trainable"] for k, v in results.items() if "error" not in v}
    if len(set(counts.values())) > 1:
        print(f"WARNING: the variants train different numbers of parameters: {counts}")
    lines = table(results, args.device == "cuda")
    line = summary(results, args)
    print()
    print("\n".join(lines))
    print(f"(mean over steps {args.warmup + 1}-{args.steps}; launch to first step: process start to the end of its "
          "first optimizer step)")
    print()
    print(line)
    print(f"(total {time.perf_counter() - t0:.0f}s)")
    if args.json:
        write_json(args.json, setting, results, table=lines, summary=line)
        print(f"results: {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
