"""Helpers for training tests: small pipelines on the demo model, run in-process or as `hcp run`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
#: ``pipeline_toml(bucket=...)`` for one 64x64 bucket (families whose size multiple the ratio buckets miss).
FIXED_64 = '{ type = "fixed", target_size = [64, 64] }'


def pipeline_toml(model: Path, data: Path, exp_dir: Path, *, extra: str = "", adapters: str | None = None,
                  max_steps: int = 4, batch_size: int = 2, save_every: int = 0, masks: bool = False,
                  bucket: str = '{ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2 }',
                  scheduler: str = '{ type = "cosine", warmup_steps = 1 }') -> str:
    """A tiny LoRA pipeline on the demo model (64x64-area buckets, a few steps); ``bucket`` and
    ``scheduler`` are TOML inline tables."""
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
scheduler = {scheduler}

[data.ds]
batch_size = {batch_size}
bucket = {bucket}

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


def hcp(*args: str, cwd: Path | None = None, timeout: int = 300,
        env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the ``hcp`` CLI in a fresh process; ``env`` adds variables."""
    return subprocess.run([sys.executable, "-m", "hcp_core", *args], cwd=cwd, env={**hcp_env(), **(env or {})},
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


def lora_on_folder_and_file(model_dir: Path, single_file: Path, data: Path, tmp: Path, max_steps: int = 2) -> Dict[str, Dict]:
    """The trained tensors of the same short LoRA run on a diffusers folder and on its single file.

    The file run sets ``model.pretrained`` to the file and ``model.config`` to the folder, as a user would.
    """
    import hcp_core

    runs = {}
    for name, extra in (("folder", []), ("file", [f'model.pretrained="{single_file}"', f'model.config="{model_dir}"'])):
        exp = tmp / name
        cfg = write_pipeline(tmp, pipeline_toml(model_dir, data, exp, max_steps=max_steps), f"{name}.toml")
        hcp_core.run(hcp_core.load_config(cfg, extra))
        runs[name] = trained_tensors(exp)
    return runs


def sampling_runs(tmp: Path, model: Path, data: Path, *, adapters: str, sample: str, max_steps: int,
                  word: str | None = None) -> Dict[str, Path]:
    """The same short run with the ``[sample]`` table ``sample`` (key "sampled") and without it
    ("plain"): their exp dirs. Both use clip skip 1, and ``word`` in every training prompt (samples
    must apply both)."""
    import hcp_core

    out = {}
    for name, extra in (("sampled", sample), ("plain", "")):
        text = pipeline_toml(model, data, tmp / name, max_steps=max_steps, adapters=adapters, extra=extra)
        if word:
            text = text.replace('prompt_template = "a picture of {caption}"', f'prompt_template = "a picture of {word}, {{caption}}"')
        text = text.replace(f'pretrained = "{model}"', f'pretrained = "{model}"\nclip_skip = 1')
        result = hcp_core.run(hcp_core.load_config(write_pipeline(tmp, text, f"{name}.toml")))
        assert result.step == max_steps
        out[name] = tmp / name
    return out


def sample_toml(prompts: str, word_names: str = "") -> str:
    """A ``[sample]`` table: ``prompts`` (a TOML list) every 2 steps, seed 11, 3 euler_a steps at 64x48."""
    return f"""
[sample]
prompts = {prompts}
{word_names}
negative_prompt = "lowres"
every = 2
seed = 11
steps = 3
size = "64x48"
scheduler = "euler_a"
cfg = 6.0
"""


def start_run(cfg: Path, exp: Path, *, until: str = "step 2/", launcher: tuple = (), timeout: int = 240) -> subprocess.Popen:
    """``hcp run cfg`` in a background process (behind ``launcher``, e.g. torchrun's argv), returned
    once ``until`` appears in ``exp/train.log``; its stderr is a text pipe."""
    import time

    proc = subprocess.Popen([sys.executable, *launcher, "-m", "hcp_core", "run", str(cfg)], env=hcp_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    log = exp / "train.log"
    while not log.exists() or until not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or stalled before {until!r}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


def assert_meta_twin(models: object, skeleton: object, parts: tuple) -> None:
    """Each of ``parts`` of ``skeleton`` has ``models``' parameter names and shapes, all on meta."""
    for name in parts:
        real = {k: v.shape for k, v in getattr(models, name).named_parameters()}
        meta = dict(getattr(skeleton, name).named_parameters())
        assert {k: v.shape for k, v in meta.items()} == real, name
        assert all(v.is_meta for v in meta.values()), name


def assert_flow_load_errors(fam: object, model_dir: Path, tmp_path: Path, *, part: str, single_name: str,
                            single_message: str, prediction_type: str, prediction_message: str) -> None:
    """A flow family's loader names the problem: a missing ``part`` folder (load and skeleton), an
    empty one, a lone single file ``single_name`` without ``model.config``, a path that does not
    exist and a ``prediction_type`` the family cannot train."""
    import shutil

    import pytest

    from hcp_core.models.loading import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / part)
    for load in (fam.load, fam.load_skeleton):
        with pytest.raises(ModelLoadError, match=part):
            load(str(broken))
    (broken / part).mkdir()  # present but empty
    with pytest.raises(ModelLoadError, match=f"could not load the {part}"):
        fam.load(str(broken))
    single = tmp_path / single_name
    single.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=single_message):
        fam.load(str(single))
    with pytest.raises(ModelLoadError, match="not found"):
        fam.load(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match=prediction_message):
        fam.load(str(model_dir), prediction_type=prediction_type)


def one_process_then_two(tmp_path: Path, model: Path, data: Path, adapters: str, *,
                          env: Dict[str, str] | None = None, **options) -> tuple:
    """The same pipeline with the same global batch twice: in this process with batch 2
    (``tmp_path/one``), then under torchrun on two processes with batch 1 each (``tmp_path/two``,
    ``env`` added). ``options`` go to :func:`pipeline_toml`. Returns (one, two, the torchrun result)."""
    import hcp_core

    one, two = tmp_path / "one", tmp_path / "two"
    texts = {exp: pipeline_toml(model, data, exp, adapters=adapters, batch_size=size, **options)
             for exp, size in ((one, 2), (two, 1))}
    hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, texts[one], "one.toml")))
    return one, two, torchrun(write_pipeline(tmp_path, texts[two], "two.toml"), env=env)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg: Path, processes: int = 2, *args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``hcp run cfg [args]`` under torchrun with ``processes`` CPU (gloo) processes; ``env`` adds variables."""
    full = {**hcp_env(), "MASTER_ADDR": "127.0.0.1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "hcp_core", "run", str(cfg), *args],
        env=full, capture_output=True, text=True, timeout=300,
    )

