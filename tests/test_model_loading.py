"""load_models: the same weights diffusers loads, frozen, with prediction type and errors by message."""
from __future__ import annotations

import json
import shutil

import pytest

from hcp_core.errors import UserError
from hcp_plugins.models.stable_diffusion.loading import load_models


@pytest.fixture(scope="module")
def bundle(demo_model_dir):
    return load_models(str(demo_model_dir))


def test_same_weights_as_diffusers_pipeline(bundle, demo_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model_dir))
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(bundle, part).state_dict(), getattr(pipe, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), part
    assert bundle.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    assert bundle.kind == "sd" and bundle.source == str(demo_model_dir)
    assert bundle.text_encoder_2 is None and bundle.tokenizer_2 is None


def test_frozen_by_default_and_trainable_on_request(bundle, demo_model_dir):
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(bundle, part)
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    free = load_models(demo_model_dir, frozen=False)
    assert all(p.requires_grad for p in free.unet.parameters())


def test_scheduler_is_ddpm_with_the_models_schedule(bundle):
    from diffusers import DDPMScheduler

    assert isinstance(bundle.scheduler, DDPMScheduler)
    assert bundle.prediction_type == bundle.scheduler.config.prediction_type == "epsilon"
    assert bundle.scheduler.config.beta_schedule == "scaled_linear"


def test_prediction_type_override_updates_the_scheduler(demo_model_dir):
    models = load_models(demo_model_dir, prediction_type="v_prediction")
    assert models.prediction_type == "v_prediction"
    assert models.scheduler.config.prediction_type == "v_prediction"
    # get_velocity is what v-prediction training targets; it needs the same schedule.
    assert models.scheduler.config.num_train_timesteps == 1000


def test_dtype_by_name(demo_model_dir):
    import torch

    models = load_models(demo_model_dir, dtype="fp16")
    assert {p.dtype for p in models.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in models.text_encoder.parameters()} == {torch.float16}
    with pytest.raises(UserError, match="dtype 'fp8' is not known"):
        load_models(demo_model_dir, dtype="fp8")


def test_other_samplers_config_still_loads_as_ddpm(demo_model_dir, tmp_path):
    model = tmp_path / "pndm"
    shutil.copytree(demo_model_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False)
    config_file.write_text(json.dumps(config))
    models = load_models(model)
    assert type(models.scheduler).__name__ == "DDPMScheduler"
    assert models.scheduler.config.beta_end == 0.012


# --------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="not found") as err:
        load_models(str(missing))
    assert str(missing) in str(err.value) and "model.pretrained" in str(err.value)


def test_hub_repo_id_says_download_first():
    with pytest.raises(UserError, match="local files only") as err:
        load_models("someone/some-model")
    assert "--local-dir" in str(err.value)


def test_folder_without_model_index(tmp_path, demo_model_dir):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder") as err:
        load_models(tmp_path)
    assert str(tmp_path) in str(err.value) and "model_index.json" in str(err.value)
    # One level too high: the message points at the model folder inside.
    parent = demo_model_dir.parent
    with pytest.raises(UserError, match=f"Did you mean '{demo_model_dir}'"):
        load_models(parent)


def test_missing_part(tmp_path, demo_model_dir):
    (tmp_path / "model_index.json").write_text((demo_model_dir / "model_index.json").read_text())
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / part).symlink_to(demo_model_dir / part)
    with pytest.raises(UserError, match=r"has no vae/ folder") as err:
        load_models(tmp_path)
    assert str(tmp_path) in str(err.value) and "copy the vae/ folder" in str(err.value)


def test_part_without_weights(tmp_path, demo_model_dir):
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    (model / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="could not load the text_encoder") as err:
        load_models(model)
    assert str(model / "text_encoder") in str(err.value)


def test_bad_prediction_type(demo_model_dir):
    with pytest.raises(UserError, match="model.prediction_type = 'x0'"):
        load_models(demo_model_dir, prediction_type="x0")


def test_single_file_that_cannot_be_read_offline(tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(checkpoint))
    with pytest.raises(UserError, match="could not read the single-file checkpoint") as err:
        load_models(checkpoint)
    assert str(checkpoint) in str(err.value) and "offline" in str(err.value)


def test_file_that_is_no_checkpoint(tmp_path):
    notes = tmp_path / "model.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match="neither a diffusers folder nor a checkpoint file"):
        load_models(notes)


def test_part_published_only_as_fp16_variant(tmp_path, demo_model_dir):
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    unet_dir = model / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    models = load_models(model)
    reference = load_models(demo_model_dir)
    assert all((a == b).all() for a, b in zip(models.unet.parameters(), reference.unet.parameters()))


def test_skeleton_has_every_layer_on_meta_and_reads_no_weight(tmp_path, demo_model_dir, bundle):
    import shutil

    from hcp_plugins.models.stable_diffusion.loading import ModelLoadError, load_model_skeleton

    copy = tmp_path / "model"
    shutil.copytree(demo_model_dir, copy)
    for weights in copy.glob("*/*.safetensors"):
        weights.write_bytes(b"garbage")  # a real load would fail on these
    skeleton = load_model_skeleton(copy, prediction_type="v_prediction")
    assert skeleton.kind == "sd" and skeleton.prediction_type == "v_prediction"
    for part in ("unet", "vae", "text_encoder"):
        real, meta = getattr(bundle, part), getattr(skeleton, part)
        assert [(n, tuple(p.shape)) for n, p in meta.named_parameters()] == [(n, tuple(p.shape)) for n, p in real.named_parameters()]
        assert all(p.is_meta for p in meta.parameters())
    assert skeleton.tokenizer("a red circle").input_ids == bundle.tokenizer("a red circle").input_ids
    with pytest.raises(ModelLoadError, match="not found"):
        load_model_skeleton(tmp_path / "none")
    (copy / "unet" / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"could not load the unet of"):
        load_model_skeleton(copy)
    single = tmp_path / "single.safetensors"
    single.write_bytes(b"x")
    assert load_model_skeleton(single) is None  # its layers are known only by reading it
    assert load_model_skeleton(single, config=demo_model_dir).unet.config.sample_size == bundle.unet.config.sample_size
