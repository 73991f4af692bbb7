"""``hcp check`` finds what ``hcp run`` would only find after loading the model (layer patterns,
clip_skip, LoRA init files), without reading a weight; check and run agree on the buckets."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from hcp_core import cli
from hcp_core.config import build_pipeline

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def weightless_model(demo_model_dir, tmp_path_factory) -> Path:
    """The demo model with every weight file replaced by garbage: only configs and tokenizer are usable."""
    out = tmp_path_factory.mktemp("weightless") / "model"
    shutil.copytree(demo_model_dir, out)
    for rel in WEIGHTS:
        (out / rel).write_bytes(b"not weights")
    return out


def write_pipeline(folder: Path, model: Path, data: Path, extra: str = "") -> Path:
    path = folder / "p.toml"
    path.write_text(f"""
exp_dir = "{folder / 'runs'}"
[model]
pretrained = "{model}"
[data.d]
batch_size = 2
bucket = {{ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 3 }}
[[data.d.sources]]
type = "image_folder"
img_root = "{data}"
prompt_template = "{{caption}}"
[[lora_unet]]
lr = 1e-3
rank = 2
layers = ['re:.*attn1$']
{extra}
""")
    return path


def check(path: Path, *overrides: str) -> int:
    return cli.main(["check", str(path), *overrides])


def test_a_good_pipeline_checks_clean_without_reading_weights(tmp_path, weightless_model, demo_data_dir, capsys):
    assert check(write_pipeline(tmp_path, weightless_model, demo_data_dir)) == 0
    out = capsys.readouterr().out
    assert "model: OK" in out and "mean aspect error" in out


@pytest.mark.parametrize("override, message", [
    ("lora_unet=[{lr=1e-3, layers=['re:nothing_matches']}]",
     "lora_unet[0].layers: regular expression 're:nothing_matches' matches no module of the UNet2DConditionModel"),
    ("unet=[{lr=1e-5, layers=['down_blocks.9']}]", "unet[0].layers: layer name 'down_blocks.9' matches no module"),
    ("lora_text_encoder=[{lr=1e-3, layers=['re:.*nothing$']}]", "lora_text_encoder[0].layers: regular expression 're:.*nothing$'"),
    ("model.clip_skip=4", "model.clip_skip = 4 is out of range: this text encoder has 4 layers"),
])  # fmt: skip
def test_what_the_run_finds_after_loading_check_finds_first(tmp_path, weightless_model, demo_data_dir, capsys, override, message):
    assert check(write_pipeline(tmp_path, weightless_model, demo_data_dir), override) == 2
    out = capsys.readouterr().out
    assert f"model: ERROR: {message}" in out
    assert "data.d: 12 images" in out  # the data is still checked


def test_the_check_message_is_the_runs(tmp_path, demo_model_dir, demo_data_dir, capsys):
    import hcp_core
    from hcp_core.errors import UserError

    path = write_pipeline(tmp_path, demo_model_dir, demo_data_dir)
    override = "lora_unet=[{lr=1e-3, layers=['re:nothing_matches']}]"
    assert check(path, override) == 2
    checked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model: ERROR: ")]
    with pytest.raises(UserError) as info:
        hcp_core.run(hcp_core.load_config(str(path), [override, "train.max_steps=1"]))
    assert checked == [f"model: ERROR: {info.value}"]


def test_a_broken_init_from_file_is_found_by_check(tmp_path, weightless_model, demo_data_dir, capsys):
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 32), f"{key}.lora_up.weight": torch.ones(32, 7)}, str(tmp_path / "init.safetensors"))
    extra = f"init_from = \"{tmp_path / 'init.safetensors'}\""
    assert check(write_pipeline(tmp_path, weightless_model, demo_data_dir, extra)) == 2
    out = capsys.readouterr().out
    assert f"lora_unet[0].init_from: {tmp_path / 'init.safetensors'}: '{key}.lora_up.weight' has shape (32, 7)" in out


def test_a_missing_model_is_a_check_error(tmp_path, demo_data_dir, capsys):
    assert check(write_pipeline(tmp_path, tmp_path / "no-model", demo_data_dir)) == 2
    assert "model: ERROR: model '" in capsys.readouterr().out


def test_check_and_run_report_the_same_buckets_with_a_truncated_image(tmp_path, demo_model_dir, demo_data_dir):
    from hcp_core.data.loader import build_train_data
    from hcp_core.data.report import bucket_table
    from hcp_core.train.preflight import check_pipeline

    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data, ignore=shutil.ignore_patterns("att_mask"))
    wide = Image.new("RGB", (128, 40), (200, 10, 10))  # a bucket of its own, unless it is dropped
    wide.save(data / "wide.png")
    raw = (data / "wide.png").read_bytes()
    (data / "wide.png").write_bytes(raw[: len(raw) // 2])
    pipeline = build_pipeline({
        "model": {"pretrained": str(demo_model_dir)},
        "data": {"d": {"batch_size": 2, "sources": [{"type": "image_folder", "img_root": str(data)}],
                       "bucket": {"type": "ratio", "from": "images", "target_area": 4096, "step": 8, "num_buckets": 4}}},
    }, base_dir=str(tmp_path))  # fmt: skip
    out = io.StringIO()
    assert check_pipeline(pipeline, out=out) is True
    run_data = build_train_data(pipeline, registry=pipeline.registry, verify_images=True)
    try:
        table = bucket_table(run_data.prepared["d"])
    finally:
        run_data.close()
    assert table in out.getvalue() and "data.d: 12 images" in table
    assert f"{data / 'wide.png'}: corrupt or truncated image data" in out.getvalue()
