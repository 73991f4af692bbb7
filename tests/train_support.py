"""Helpers for training tests: small pipelines on the demo model, run in-process or as `hcp run`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def pipeline_toml(model: Path, data: Path, exp_dir: Path, *, extra: str = "", adapters: str | None = None,
                  max_steps: int = 4, batch_size: int = 2, save_every: int = 0, masks: bool = False) -> str:
    """A tiny LoRA pipeline on the demo model (64x64-area buckets, a few steps)."""
    mask_line = f'att_mask = "{data / "att_mask"}"' if masks else ""
    if adapters is None:
        adapters = """
[[lora_unet]]
lr = 1e-3
rank = 2
alpha = 2.0
layers = ['re:.*\\.attn2$']
"""
    return f"""
seed = 7
exp_dir = "{exp_dir}"

[model]
pretrained = "{model}"

[train]
max_steps = {max_steps}
save_every = {save_every}
log_every = 1
optimizer = {{ type = "adamw" }}
scheduler = {{ type = "cosine", warmup_steps = 1 }}

[data.ds]
batch_size = {batch_size}
bucket = {{ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2 }}

[[data.ds.sources]]
type = "image_folder"
img_root = "{data}"
prompt_template = "a picture of {{caption}}"
{mask_line}
{adapters}
{extra}
"""


def write_pipeline(tmp: Path, text: str, name: str = "pipe.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def hcp_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def hcp(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the ``hcp`` CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "hcp_core", *args], cwd=cwd, env=hcp_env(),
                          capture_output=True, text=True, timeout=timeout)


def trained_tensors(exp_dir: Path) -> Dict[str, "object"]:
    """The trainable tensors of the newest checkpoint in ``exp_dir``."""
    ckpts = sorted((exp_dir / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "trainable.safetensors"))


def assert_same_tensors(a: Dict, b: Dict, exact: bool = True, atol: float = 0.0) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"
