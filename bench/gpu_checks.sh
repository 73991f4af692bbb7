#!/usr/bin/env bash
# The GPU checks of a leased CUDA machine, as one prepared run (see docs/training.md, "On a GPU").
#
#   bash bench/gpu_checks.sh [SECONDS]     # SECONDS: the time the whole script may take (default 560)
#
# 1. the versions it runs with and the card, and the tests that only run on CUDA;
# 2. a preflight: bench_gpu.py's tiny model on the GPU, hcp's variant, 3 steps (fails fast, within a
#    minute, when something is missing, instead of after the big model is built);
# 3. bench_gpu.py's full setting (3 profiled steps after the timed ones), variants ordered by what matters most, each stopped after
#    300 s and all of them by the deadline, so partial results still come back;
# 4. bench_lora_hook.py: hcp's LoRA hook against a wrapper module, in the time left.
# Results land in $OUT (default /tmp/hcp_gpu_out): bench_gpu.json, bench_gpu_logs.tgz (each variant's log)
# and bench_lora_hook.json.
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

echo "== CUDA-only tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -3

echo "== preflight (tiny model on the GPU)"
if ! timeout 150 "$PY" bench/bench_gpu.py --tiny --device cuda --variants hcp --steps 3 --warmup 1 --profile 1 --variant-timeout 120; then
    echo "preflight FAILED: the full bench is not run"
    exit 1
fi

left=$((budget - SECONDS - 110))  # the last 95 s: the LoRA hook/wrapper comparison
echo "== full setting (deadline ${left}s)"
"$PY" bench/bench_gpu.py --json "$OUT/bench_gpu.json" --variant-timeout 300 --deadline "$left" \
    --profile 3 --variants hcp,example,hcp-cached-compile,hcp-cached-cudagraphs,hcp-cached,minimal,hcp-compile
# The lease returns at most 8 files: the variants' logs travel as one archive.
(cd "$OUT" && tar czf bench_gpu_logs.tgz bench_gpu.*.log && rm -f bench_gpu.*.log)

echo "== LoRA as a forward hook vs as a wrapper module (SD 1.5 UNet, batch 4, 512 px, bf16)"
timeout $((budget - SECONDS - 10)) "$PY" bench/bench_lora_hook.py --device cuda --rounds 3 --steps 5 --warmup 3 \
    --json "$OUT/bench_lora_hook.json" 2>&1 | tail -15
echo "== done after ${SECONDS}s"
