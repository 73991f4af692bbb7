"""DreamArtist: positive and negative custom words trained together under classifier-free guidance."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import hcp_core
from hcp_core.config.schema import TrainConfig
from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_plugins.models.stable_diffusion.conditioning import make_prompt_encoder, unet_conditioning
from hcp_core.models.custom_words import read_embedding
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.tools.create_embedding import create_embedding
from hcp_core.train.diffusion import draw_noise_and_timesteps
from hcp_plugins.adapters.prompt_tuning.adapter import PromptTuningAdapter
from hcp_plugins.adapters.prompt_tuning.config import DreamArtistConfig, PromptTuningConfig, TrainedWord
from hcp_plugins.models.stable_diffusion import StableDiffusionFamily
from train_support import REPO

WORDS = {"my-shape": "shape", "my-shape-neg": None}


def make_words(model: Path, emb: Path) -> None:
    for name, init in WORDS.items():
        create_embedding(str(model), name, 2, init_text=init, out=str(emb), seed=3)


def dreamartist_config(emb: Path, **guidance) -> PromptTuningConfig:
    return PromptTuningConfig(emb_dir=str(emb), train=[TrainedWord(n, 0.01) for n in WORDS],
                              dreamartist=DreamArtistConfig(negative={"My-Shape": "my-shape-neg"}, **guidance))


@pytest.mark.parametrize("fixture", ["demo_model_dir", "sdxl_model_dir"])
def test_the_guided_prediction_is_two_forwards_combined(fixture, request, tmp_path) -> None:
    """Dynamic guidance ("cos": 1.5 at t = 0 to 4.0 at t = T - 1) against two UNet forwards done here."""
    model_dir = request.getfixturevalue(fixture)
    make_words(model_dir, tmp_path / "embs")
    models = load_models(model_dir)
    adapter = PromptTuningAdapter({"text_encoder": [dreamartist_config(tmp_path / "embs", cfg_scale=1.5,
                                                                        cfg_scale_noisy=4.0, cfg_curve="cos")]},
                                  context=AdapterContext(exp_dir=str(tmp_path)))
    adapter.attach(models)
    encoder = adapter.wrap_prompt_encoder(make_prompt_encoder(models))
    prompts = ["a picture of a my-shape, red", "MY-SHAPE on a my-shape-toy"]
    assert adapter.negative_prompts(prompts) == ["a picture of a my-shape-neg, red", "my-shape-neg on a my-shape-toy"]
    batch = {"prompts": prompts, "original_size_hw": [(64, 64)] * 2, "crop_top_left": [(0, 0)] * 2,
             "target_size_hw": [(64, 64)] * 2}
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids, seed, step = [5, 9], 7, 3
    out = StableDiffusionFamily().training_prediction(models, encoder, batch, latents, ids, seed=seed, step=step,
                                                      train=TrainConfig(max_steps=1), autocast=contextlib.nullcontext,
                                                      train_text=True)  # fmt: skip

    sched = models.scheduler
    noise, t = draw_noise_and_timesteps(latents, ids, seed=seed, step=step,
                                        num_train_timesteps=sched.config.num_train_timesteps)
    noisy = sched.add_noise(latents, noise, t)
    negative = dict(batch, prompts=["a picture of a my-shape-neg, red", "my-shape-neg on a my-shape-toy"])
    e_pos = models.unet(noisy, t, **unet_conditioning(encoder, batch)).sample
    e_neg = models.unet(noisy, t, **unet_conditioning(encoder, negative)).sample
    rate = torch.sin(t.float() / (sched.config.num_train_timesteps - 1) * math.pi / 2)
    scale = (1.5 + 2.5 * rate).view(-1, 1, 1, 1)
    expected = e_neg + scale * (e_pos - e_neg)
    torch.testing.assert_close(out.pred, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(e_pos, e_neg, atol=1e-4), "the two branches must differ for the check to mean anything"
    out.pred.square().mean().backward()  # both words get gradients through the guided prediction
    words = encoder.encoders[0].words if hasattr(encoder, "encoders") else encoder.words
    for name in WORDS:
        assert words.params[name].grad is not None and words.params[name].grad.abs().sum() > 0, name


def test_the_example_trains_and_exports_both_words(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    """examples/dreamartist.toml on the demo, as its header says to run it (2 steps)."""
    (tmp_path / "demo").mkdir()
    os.symlink(demo_model_dir, tmp_path / "demo" / "model")
    shutil.copytree(demo_data_dir, tmp_path / "demo" / "data")
    monkeypatch.chdir(tmp_path)
    make_words(Path("demo/model"), Path("demo/embs"))
    start = {name: read_embedding(tmp_path / "demo" / "embs" / f"{name}.pt") for name in WORDS}
    pipeline = hcp_core.load_config(REPO / "examples" / "dreamartist.toml",
                                    ["train.max_steps=2", "train.save_every=0", f'exp_dir="{tmp_path / "run"}"'])
    assert pipeline.adapters["tokenizer_pt"][0].dreamartist.negative == {"my-shape": "my-shape-neg"}
    result = hcp_core.run(pipeline)
    assert result.step == 2
    for name in WORDS:
        for suffix in (".pt", ".safetensors"):
            trained = read_embedding(tmp_path / "run" / "embeddings" / f"{name}{suffix}")
            assert trained.shape == start[name].shape and not torch.allclose(trained, start[name]), f"{name}{suffix}"


def test_options_are_validated_and_flux_refused(tmp_path) -> None:
    raw = {"model": {"pretrained": "m"}, "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "x"}],
                                                        "bucket": {"type": "fixed", "target_size": [64, 64]}}}}

    def build(dreamartist: dict) -> None:
        hcp_core.build_pipeline({**raw, "tokenizer_pt": {"train": [{"name": "a"}], "dreamartist": dreamartist}})

    with pytest.raises(ConfigError, match=r"tokenizer_pt\.dreamartist\.negative: 'a' is its own negative word"):
        build({"negative": {"a": "A"}})
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.dreamartist\.negative: map at least one"):
        build({"negative": {}})
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.dreamartist\.cfg_curve: must be one of 'linear', 'cos', 'cos2'"):
        build({"negative": {"a": "b"}, "cfg_curve": "sine"})
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.dreamartist\.cfg_scale: must be in \(0, 30\], got 0\.0"):
        build({"negative": {"a": "b"}, "cfg_scale": 0.0})
    flux = ModelBundle(unet=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None, kind="flux")
    adapter = PromptTuningAdapter({"text_encoder": [dreamartist_config(tmp_path)]}, context=AdapterContext(exp_dir="."))
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.dreamartist: FLUX\.1 is guidance-distilled"):
        adapter.attach(flux)
