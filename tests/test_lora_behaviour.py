"""A LoRA trained by `hcp run` behaves like the trained model once diffusers' own loader applies it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hcp_core
from train_support import hcp_env, pipeline_toml, write_pipeline

ADAPTERS = """
[[lora_unet]]
lr = 3e-3
rank = 4
alpha = 4.0
layers = ['re:.*\\.attn.?$', 're:.*\\.ff$']
"""


def test_trained_lora_lowers_denoising_error_most_at_weight_one(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    text = pipeline_toml(demo_model_dir, demo_data_dir, exp, adapters=ADAPTERS, max_steps=120, batch_size=4)
    text = text.replace('{ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2 }',
                        '{ type = "fixed", target_size = [64, 64] }')
    cfg = write_pipeline(tmp_path, text)
    hcp_core.run(hcp_core.load_config(cfg, ['train.scheduler={ type = "constant" }', "train.optimizer.weight_decay=0.0"]))
    script = Path(__file__).with_name("lora_denoise_eval.py")
    done = subprocess.run(
        [sys.executable, str(script), str(demo_model_dir), str(exp / "lora.safetensors"), str(demo_data_dir), "[0.0, 0.5, 1.0, 1.5]"],
        env=hcp_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    error = {float(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    # Training lowered the error on its own images...
    assert error[1.0] < 0.95 * error[0.0], error
    # ...and the file's alpha/rank scale is right: weight 1.0 (the trained model) is best, not 0.5 or 1.5.
    assert min(error, key=error.get) == 1.0, error
