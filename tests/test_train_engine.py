"""The training engine end to end on the demo model: run folder, resume, failures, fine-tune groups."""
from __future__ import annotations

import math
import signal
import tomllib

import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core import cli
from train_support import (assert_same_tensors, hcp, lora_on_folder_and_file, pipeline_toml, start_run, trained_tensors,
                           write_pipeline)


def test_a_run_writes_config_checkpoints_exports_and_logs(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=4, save_every=2))
    result = hcp_core.run(hcp_core.load_config(cfg))
    assert result.step == 4 and result.last_loss == result.last_loss  # finite, not NaN
    resolved = tomllib.loads((exp / "config.toml").read_text())
    assert resolved["seed"] == 7 and resolved["train"]["max_steps"] == 4
    assert resolved["data"]["ds"]["bucket"]["from"] == "images"
    assert [p.name for p in sorted((exp / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    assert (exp / "lora-2.safetensors").is_file() and (exp / "lora.safetensors").is_file()
    assert list((exp / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    log = (exp / "train.log").read_text()
    assert "step 4/4" in log and "saved checkpoint" in log
    ups = [t for k, t in load_file(str(exp / "lora.safetensors")).items() if k.endswith("lora_up.weight")]
    assert ups and all(t.abs().sum() > 0 for t in ups), "LoRA up weights did not train"


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=500))
    proc = start_run(cfg, exp)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = sorted((exp / "checkpoints").glob("step-*"))
    assert saved and int(saved[-1].name.split("-")[1]) >= 2
    assert "interrupted: saving a checkpoint" in (exp / "train.log").read_text()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, demo_model_dir, demo_data_dir, monkeypatch, capsys) -> None:
    from hcp_plugins.losses import mse

    calls = {"n": 0}
    original = mse.MseLoss.__call__

    def poisoned(self, pred, target, inputs):
        calls["n"] += 1
        out = original(self, pred, target, inputs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(mse.MseLoss, "__call__", poisoned)
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=6, save_every=2))
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 3" in err
    assert "step-00000002" in err and "Traceback" not in err
    assert [p.name for p in (exp / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_missing_model_folder_exits_2_without_a_traceback(tmp_path, demo_data_dir) -> None:
    cfg = write_pipeline(tmp_path, pipeline_toml(tmp_path / "no-model", demo_data_dir, tmp_path / "exp"))
    done = hcp("run", str(cfg))
    assert done.returncode == 2
    assert str(tmp_path / "no-model") in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora_unet=[{ layers = ['re:.*\\.atn2$'] }]", "'re:.*\\.atn2$' matches no module"),
        ("unet=[{ layers = ['down_blocks.0.attentions.0.transformer_blocks.0.atn1'] }]",
         "unet[0].layers: layer name 'down_blocks.0.attentions.0.transformer_blocks.0.atn1' matches no module"
         " of the UNet2DConditionModel. Names are those of model.named_modules(); near ones: "
         "'down_blocks.0.attentions.0.transformer_blocks.0.attn1'"),
    ],
    ids=["regex-matches-nothing", "name-with-suggestion"],
)
def test_a_layer_pattern_that_matches_nothing_is_named(tmp_path, demo_model_dir, demo_data_dir, capsys, override, message) -> None:
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp"))
    assert cli.main(["run", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_finetune_group_trains_only_the_named_layers(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    adapters = """
[[unet]]
lr = 1e-3
layers = ['down_blocks.0.attentions.0.proj_in', 're:up_blocks\\.2\\.resnets\\.0\\.norm.']
"""
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, adapters=adapters, max_steps=2))
    hcp_core.run(hcp_core.load_config(cfg))
    trained = load_file(str(exp / "finetune.safetensors"))
    base = load_file(str(demo_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    expected = {f"unet.{k}" for k in base if k.startswith("down_blocks.0.attentions.0.proj_in.")
                or k.startswith("up_blocks.2.resnets.0.norm")}
    assert set(trained) == expected
    assert all(not torch.equal(trained[k], base[k[len("unet."):]]) for k in expected), "a selected layer did not change"
    assert set(trained_tensors(exp)) == {f"finetune/{k}" for k in expected}


def test_two_datasets_are_drawn_every_step_with_their_loss_weights(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    from hcp_core.train import loop

    seen = []
    original = loop.batch_loss

    def spy(run, batches, step):
        seen.append({name: (b["loss_weight"], len(b["indices"])) for name, b in batches.items()})
        return original(run, batches, step)

    monkeypatch.setattr(loop, "batch_loss", spy)
    extra = f"""
[data.reg]
batch_size = 1
loss_weight = 0.25
bucket = {{ type = "fixed", target_size = [64, 64] }}
sources = [{{ type = "image_folder", img_root = "{demo_data_dir}" }}]
"""
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", extra=extra, max_steps=3,
                                                 save_every=0) + "")
    hcp_core.run(hcp_core.load_config(cfg, ["train.gradient_accumulation=2"]))
    assert seen == [{"ds": (1.0, 2), "reg": (0.25, 1)}] * 6


def test_options_together_masks_cache_ema_bf16_min_snr_v_prediction(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    from hcp_core.train import loop

    used = []
    original = loop.batch_loss

    def spy(run, batches, step):
        b = batches["ds"]
        used.append(("latents" in b, b["weight_map"] is not None, run.models.prediction_type))
        return original(run, batches, step)

    monkeypatch.setattr(loop, "batch_loss", spy)
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, masks=True, max_steps=3))
    result = hcp_core.run(hcp_core.load_config(cfg, [
        "train.ema={ enabled = true, decay = 0.5 }", 'model.mixed_precision="bf16"', "train.min_snr_gamma=5.0",
        'model.prediction_type="v_prediction"', "data.ds.cache_latents=true", "train.noise_offset=0.05",
    ]))
    assert math.isfinite(result.last_loss)
    assert used and all(u == (True, u[1], "v_prediction") for u in used) and any(u[1] for u in used)
    assert list((exp / "latent_cache").rglob("*.safetensors")), "latents were not cached"
    raw = trained_tensors(exp)
    exported = load_file(str(exp / "lora.safetensors"))
    # The final export holds the EMA weights, which lag the raw ones.
    key = next(k for k in raw if k.endswith("lora_up.weight"))
    assert key.startswith("lora/")
    assert any(not torch.equal(exported[k], v) for k, v in load_file(str(exp / "lora-3.safetensors")).items()
               if k.endswith("lora_up.weight"))


def test_a_single_file_checkpoint_trains_like_its_diffusers_folder(tmp_path, demo_model_dir, demo_data_dir) -> None:
    from hcp_core.tools.merge_lora import merge_lora

    # An identity "merge" (LoRA weight 0) writes the demo model as one original-layout file.
    exp_lora = tmp_path / "seed"
    hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp_lora, max_steps=1),
                                                     "seed.toml")))
    single = tmp_path / "model.safetensors"
    merge_lora(demo_model_dir, [(str(exp_lora / "lora.safetensors"), 0.0)], tmp_path / "merged", single_file=single)
    runs = lora_on_folder_and_file(demo_model_dir, single, demo_data_dir, tmp_path)
    assert_same_tensors(runs["folder"], runs["file"], exact=False, atol=1e-6)
