#!/usr/bin/env bash
# The GPU checks of a leased CUDA machine, as one prepared run (see docs/training.md, "On a GPU").
#
#   bash bench/gpu_checks.sh [SECONDS]     # SECONDS: the time the whole script may take (default 560)
#   DRY_RUN=1 bash bench/gpu_checks.sh 400 # the same steps on a CPU with the tiny model: checks the script
#
# 1. the versions it runs with and the card, and the tests that only run on CUDA;
# 2. a preflight: bench_gpu.py's tiny model on the GPU, hcp's variant, 3 steps (fails fast, within a
#    minute, when something is missing, instead of after the big model is built);
# 3. bench_gpu.py's full setting (3 profiled steps after the timed ones): hcp's defaults, the
#    example loop and the two long-run variants (the issue's targets), each stopped after 300 s and
#    all of them by a deadline, so partial results still come back (about 6-8 minutes with the
#    two compiles);
# 4. in the time left: bench_lora_hook.py (hcp's LoRA hook against a wrapper module, 100 s at
#    most), then the other bench_gpu.py variants (hcp again, the control of the cudnn.benchmark
#    and channels-last experiments; cached latents alone, the minimal loop, compile alone).
# Results land in $OUT (default /tmp/hcp_gpu_out): bench_gpu.json and bench_gpu_more.json, each with
# its variants' logs as a .tgz, and bench_lora_hook.json.
# Needs the checkout on PYTHONPATH (set here) and torch, diffusers, transformers, accelerate,
# pluggy, attrs, cattrs, safetensors, tokenizers, Pillow importable.
set -u
budget=${1:-560}
OUT=${OUT:-/tmp/hcp_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" - <<'EOF' || exit 1
import torch, diffusers, transformers, accelerate, cattrs, pluggy
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF

# DRY_RUN=1: the same steps on a CPU with the tiny demo model (checks this script, measures nothing).
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu BENCH_ARGS="--tiny --device cpu --steps 4 --warmup 1"
    HOOK_ARGS="--device cpu --rounds 1 --steps 1 --warmup 0 --latent 8"
else
    DEVICE=cuda BENCH_ARGS="" HOOK_ARGS="--device cuda --rounds 3 --steps 5 --warmup 3"
fi

echo "== CUDA-only tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -3

echo "== preflight (tiny model on the GPU)"
if ! timeout 150 "$PY" bench/bench_gpu.py --tiny --device $DEVICE --variants hcp --steps 3 --warmup 1 --profile 1 --variant-timeout 120; then
    echo "preflight FAILED: the full bench is not run"
    exit 1
fi

# bench_gpu.py's variants in two parts, what decides the issue's targets first: hcp's defaults and
# the example loop, then the long-run variants; the LoRA hook comparison; then the rest in the time left.
bench() {  # NAME DEADLINE VARIANTS
    echo "== full setting: $3 (deadline $2 s)"
    "$PY" bench/bench_gpu.py $BENCH_ARGS --json "$OUT/$1.json" --variant-timeout 300 --deadline "$2" --profile 3 \
        --variants "$3"
    # The lease returns at most 8 files: each part's variant logs travel as one archive.
    (cd "$OUT" && tar czf "$1_logs.tgz" "$1".*.log && rm -f "$1".*.log)
}
bench bench_gpu $((budget - SECONDS - 15)) hcp,example,hcp-cached-compile,hcp-cached-cudagraphs

hook_time=$((budget - SECONDS - 10 < 100 ? budget - SECONDS - 10 : 100))
if [ "$hook_time" -ge 60 ]; then
    echo "== LoRA as a forward hook vs as a wrapper module (SD 1.5 UNet, batch 4, 512 px, bf16)"
    timeout "$hook_time" "$PY" bench/bench_lora_hook.py $HOOK_ARGS --json "$OUT/bench_lora_hook.json" 2>&1 | tail -15
fi

if [ $((budget - SECONDS)) -gt 60 ]; then
    bench bench_gpu_more $((budget - SECONDS - 10)) hcp,hcp-cudnn-benchmark,hcp-channels-last,hcp-cached,minimal,hcp-compile
fi
echo "== done after ${SECONDS}s"
