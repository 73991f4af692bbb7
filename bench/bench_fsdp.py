"""Benchmark: what FSDP saves in memory for a full UNet fine-tune, 2 CPU (gloo) processes.

    python bench/bench_fsdp.py                          # UNet widths 128,256,512,512 (~135M parameters)
    python bench/bench_fsdp.py --variants data-parallel,fsdp --json /tmp/fsdp.json
    MALLOC_MMAP_THRESHOLD_=131072 python bench/bench_fsdp.py   # freed buffers go back to the OS (see below)

The same pipeline runs under ``torchrun --standalone --nproc_per_node 2``: ``data-parallel`` (each
process holds the whole trained weights, their gradients (hcp's all-reduce buckets, allocated at
build) and AdamW's two moments: ~16 bytes per trained fp32 parameter), ``fsdp``
(``ACCELERATE_USE_FSDP=true``: hcp shards those with FSDP2, one unit per outermost block) and
``fsdp-blocks`` (also ``FSDP_TRANSFORMER_CLS_TO_WRAP=BasicTransformerBlock,ResnetBlock2D``: smaller
units). Expected saving per process: trained parameters x 16 bytes x (1 - 1/2), less the units
gathered at a time (whole weights and gradients of one or two units).

Model (built once under ``/tmp/hcp_bench_fsdp``, seeded random weights, nothing downloaded): a UNet
of SD 1.5's block layout (3 cross-attention levels + 1 plain, 2 ResNets per level, 8 heads) with
narrower ``block_out_channels``, hcp's demo tokenizer, tiny text encoder and VAE. Data: 4 demo
images in a fixed 64x64 bucket (8x8 latents), batch 1 per process, fp32 (``mixed_precision =
"no"``), AdamW, ``[[unet]] layers = ['']`` (the whole UNet trains), 2 steps.

Each process is this script's ``--worker`` (``build_run`` + ``train``, hcp's library API) and
reports: RSS after imports, RSS once the run is built (model loaded; sharded under FSDP), the
peak RSS during the training steps (VmHWM reset through ``/proc/self/clear_refs`` after the build,
read at each optimizer step's end) and ``ru_maxrss`` at the very end (loading, the final
checkpoint, which the main process writes from whole tensors, and the export included). The runs
see the same global batch, so their ``finetune.safetensors`` must agree up to float reduction
order; the script checks that.

RSS counts what glibc's malloc keeps after ``free``: by default it keeps much of what FSDP frees
(the whole weights after sharding, the buffers of gathered units), which hides part of the
saving on a CPU; ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold) returns such buffers and
shows what the processes actually hold.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import TimedScheduler, current_rss_mib, peak_rss_since_reset_mib, reset_peak_rss  # noqa: E402

WORK = Path("/tmp/hcp_bench_fsdp")
#: Bump when the model layout below changes, so a cached folder is rebuilt.
LAYOUT_VERSION = 1
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
#: fsdp: hcp's default units (each outermost block: down_blocks.N, up_blocks.N, the mid block's parts);
#: fsdp-blocks: one unit per ResNet / transformer layer (accelerate's fsdp_transformer_layer_cls_to_wrap).
VARIANTS = {"data-parallel": {}, "fsdp": FSDP_ENV,
            "fsdp-blocks": {**FSDP_ENV, "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock,ResnetBlock2D"}}
BYTES_PER_TRAINED = 16  # fp32 weight + gradient + AdamW's exp_avg and exp_avg_sq


def build_model(out: Path, widths: Tuple[int, ...]) -> Path:
    """An SD 1.5-layout diffusers folder whose UNet has ``widths`` as block_out_channels."""
    import torch

    from hcp_core.demo.model import (calibrated_vae, ddpm_scheduler, save_demo_pipeline, save_demo_tokenizer,
                                     tiny_text_encoder, tiny_unet, train_demo_tokenizer)
    from hcp_core.models.pipelines import pipeline_class

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(vocab)
    unet = tiny_unet(cross_attention_dim=text_encoder.config.hidden_size, block_out_channels=widths,
                     layers_per_block=2, norm_num_groups=32, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    pipe = pipeline_class("StableDiffusionPipeline")(
        vae=calibrated_vae(3), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddpm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return save_demo_pipeline(pipe, out, kind="bench-fsdp", seed=0, prediction_type="epsilon",
                              widths=list(widths), layout=LAYOUT_VERSION)


def ensure_inputs(work: Path, widths: Tuple[int, ...]) -> Tuple[Path, Path]:
    """The model folder and the 4-image dataset under ``work``, built unless already there."""
    from hcp_core.demo.dataset import build_demo_dataset
    from hcp_core.demo.model import MARKER_FILE

    model = work / ("model-" + "-".join(map(str, widths)))
    try:
        built = json.loads((model / MARKER_FILE).read_text()).get("layout") == LAYOUT_VERSION
    except (OSError, ValueError):
        built = False
    if not built:
        build_model(model, widths)
    data = work / "data"
    if not (data / "003.txt").exists():
        build_demo_dataset(data, n_images=4, seed=0)
    return model, data


def pipeline_text(model: Path, data: Path, exp_dir: Path, steps: int) -> str:
    """A full fine-tune of the UNet (paths as JSON strings: valid TOML)."""
    return f"""
seed = 7
exp_dir = {json.dumps(str(exp_dir))}

[model]
pretrained = {json.dumps(str(model))}
mixed_precision = "no"

[train]
max_steps = {steps}
save_every = 0
log_every = 1
optimizer = {{ type = "adamw" }}
scheduler = {{ type = "constant" }}

[data.ds]
batch_size = 1
bucket = {{ type = "fixed", target_size = [64, 64] }}

[[data.ds.sources]]
type = "image_folder"
img_root = {json.dumps(str(data))}

[[unet]]
lr = 1e-4
layers = ['']
"""


def worker(toml: Path, out_dir: Path) -> None:
    """One torchrun process: build and train the pipeline, then write this rank's memory figures."""
    import attrs

    import hcp_core
    from hcp_core.train.runner import build_run, train

    after_imports = current_rss_mib()
    start = time.perf_counter()
    run = build_run(hcp_core.load_config(toml), overwrite=True)
    built = current_rss_mib()
    resettable = reset_peak_rss()
    peaks: List[Optional[float]] = []  # the peak RSS so far, read at each optimizer step's end
    probe = SimpleNamespace(step_done=lambda: peaks.append(peak_rss_since_reset_mib()))
    run = attrs.evolve(run, lr_scheduler=TimedScheduler(run.lr_scheduler, probe))
    trained = sum(p.numel() for p in run.trained_params)  # a shard's numel() is the whole tensor's
    try:
        train(run)
    finally:
        run.close()
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "trained_params": trained, "rss_after_imports_mib": after_imports, "rss_built_mib": built,
        "peak_steps_mib": peaks[-1] if resettable else None, "build_train_s": time.perf_counter() - start,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def launch(name: str, toml: Path, out_dir: Path, threads: int) -> Dict[str, Any]:
    """``torchrun`` 2 workers on ``toml`` with variant ``name``'s environment; the ranks' figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), **VARIANTS[name])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "--worker", str(toml), "--out", str(out_dir)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"variant": name, "wall_s": wall, "ranks": ranks}


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files' tensors (same keys required)."""
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    if sorted(left) != sorted(right):
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def report(results: List[Dict[str, Any]], expected_mib: float, differences: Dict[str, float]) -> None:
    print(f"\n{'variant':<14} {'rank':>4} {'after imports':>14} {'built':>8} {'peak in steps':>14} "
          f"{'ru_maxrss':>10} {'run s':>6} {'wall s':>7}   (MiB; run: build + train)")
    for res in results:
        for r in res["ranks"]:
            peak = "n/a" if r["peak_steps_mib"] is None else f"{r['peak_steps_mib']:.0f}"
            print(f"{res['variant']:<14} {r['rank']:>4} {r['rss_after_imports_mib']:>14.0f} {r['rss_built_mib']:>8.0f} "
                  f"{peak:>14} {r['ru_maxrss_mib']:>10.0f} {r['build_train_s']:>6.1f} {res['wall_s']:>7.1f}")
    trained = results[0]["ranks"][0]["trained_params"]
    print(f"expected saving per process: {trained:,} trained parameters x {BYTES_PER_TRAINED} B x (1 - 1/2) = "
          f"{expected_mib:.0f} MiB")
    dp = results[0]
    for res in results[1:]:
        for key in ("peak_steps_mib", "ru_maxrss_mib"):
            if all(r[key] is not None for r in dp["ranks"] + res["ranks"]):
                saved = [a[key] - b[key] for a, b in zip(dp["ranks"], res["ranks"])]
                print(f"{res['variant']} saves ({key}): rank 0 {saved[0]:.0f} MiB, rank 1 {saved[1]:.0f} MiB")
        difference = differences[res["variant"]]
        print(f"{res['variant']}: finetune.safetensors vs data parallel: max |difference| {difference:.2e} "
              f"({'OK' if difference <= 1e-4 else 'ABOVE 1e-4'})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,256,512,512", help="the UNet's block_out_channels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="data-parallel first, then FSDP ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the runs' exp dirs under --work")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun process on this pipeline
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.out)
        return 0
    widths = tuple(int(w) for w in args.widths.split(","))
    names = args.variants.split(",")
    if names[0] != "data-parallel" or not set(names) <= set(VARIANTS):
        raise SystemExit(f"--variants: data-parallel first, then some of {', '.join(VARIANTS)}")
    model, data = ensure_inputs(args.work, widths)
    results = []
    for name in names:
        exp = args.work / f"exp-{name}"
        shutil.rmtree(exp, ignore_errors=True)  # not kept aside as hcp's overwrite would (~0.5 GB each)
        toml = args.work / f"{name}.toml"
        toml.write_text(pipeline_text(model, data, exp, args.steps))
        print(f"running {name} ...", flush=True)
        results.append(launch(name, toml, args.work / f"figures-{name}", args.threads))
    expected = results[0]["ranks"][0]["trained_params"] * BYTES_PER_TRAINED * (1 - 1 / 2) / 2**20
    final = {name: args.work / f"exp-{name}" / "finetune.safetensors" for name in names}
    differences = {name: max_difference(final[names[0]], final[name]) for name in names[1:]}
    report(results, expected, differences)
    if not args.keep:  # each holds a checkpoint and two exports: ~2.6 GB at the default widths
        for name in names:
            shutil.rmtree(args.work / f"exp-{name}")
    if args.json:
        args.json.write_text(json.dumps({"widths": widths, "steps": args.steps, "results": results,
                                         "expected_saving_mib": expected, "max_difference": differences}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
