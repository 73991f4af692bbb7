"""Samples during training: layout, TensorBoard, ``hcp generate`` reproduces them, training unchanged by them."""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hcp_core
from hcp_core import cli
from hcp_core.errors import ConfigError
from hcp_core.generation.metadata import parse_parameters, read_png_text
from hcp_core.models.custom_words import write_embedding
from hcp_core.train.sample_images import isolated_from_training
from train_support import assert_same_tensors, sample_toml, sampling_runs, trained_tensors

WORD = "my-cat"
ADAPTERS = f"""
[[lora_unet]]
lr = 1e-2
rank = 2
layers = ['re:.*\\.attn2$']

[[lora_text_encoder]]
lr = 1e-2
rank = 2
layers = ['re:.*self_attn$']

[tokenizer_pt]
emb_dir = "{{emb}}"
train = [{{ name = "{WORD}", lr = 1e-2 }}]
"""
SAMPLE = sample_toml('["a {pt1} on a red circle", "a blue square"]', 'word_names = { pt1 = "my-cat" }')
MAX_STEPS = 3


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_model_dir, demo_data_dir):
    """The same tiny run (LoRA on UNet and text encoder, a trained custom word, clip skip 1)
    with and without ``[sample]``."""
    tmp = tmp_path_factory.mktemp("sampling")
    write_embedding(tmp / "embs" / f"{WORD}.safetensors", WORD, torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.02)
    return sampling_runs(tmp, demo_model_dir, demo_data_dir, adapters=ADAPTERS.replace("{emb}", str(tmp / "embs")),
                         sample=SAMPLE, max_steps=MAX_STEPS, word=WORD)


def test_samples_layout_grid_and_metadata(runs) -> None:
    samples = runs["sampled"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-2", "step-3"]  # every 2 steps, and at the end
    for step in (2, 3):
        folder = samples / f"step-{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "grid.png"]
        first, second = pixels(folder / "00.png"), pixels(folder / "01.png")
        assert first.shape == (48, 64, 3)
        grid = pixels(folder / "grid.png")
        assert grid.shape == (48, 128, 3)  # two prompts side by side
        assert np.array_equal(grid[:, :64], first) and np.array_equal(grid[:, 64:], second)
        params = parse_parameters(read_png_text(folder / "01.png")["parameters"])
        assert params["prompt"] == "a blue square" and params["seed"] == 12  # prompt k has seed + k
        assert params["Training step"] == str(step) and params["clip_skip"] == 1 and params["scheduler"] == "euler_a"
    assert parse_parameters(read_png_text(samples / "step-2" / "00.png")["parameters"])["prompt"] == f"a {WORD} on a red circle"
    assert not np.array_equal(pixels(samples / "step-2" / "00.png"), pixels(samples / "step-3" / "00.png")), \
        "samples should show the model as it trains"
    assert not (runs["plain"] / "samples").exists()


def test_samples_go_to_tensorboard(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(runs["sampled"] / "logs"), size_guidance={IMAGES: 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/0", "samples/1"]
    logged = events.Images("samples/0")
    assert [e.step for e in logged] == [2, 3]
    decoded = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB")).astype(np.int16)
    assert np.array_equal(decoded, pixels(runs["sampled"] / "samples" / "step-3" / "00.png"))


def test_sampling_leaves_the_trained_weights_bit_identical(runs) -> None:
    assert_same_tensors(trained_tensors(runs["sampled"]), trained_tensors(runs["plain"]), exact=True)
    assert_same_tensors(load_file(str(runs["sampled"] / "lora.safetensors")), load_file(str(runs["plain"] / "lora.safetensors")))


def test_hcp_generate_with_the_exported_lora_reproduces_the_final_sample(runs, demo_model_dir, tmp_path) -> None:
    exp = runs["sampled"]
    final = pixels(exp / "samples" / f"step-{MAX_STEPS}" / "00.png")
    common = ["generate", "--model", str(demo_model_dir), "-p", f"a {WORD} on a red circle", "--negative-prompt", "lowres",
              "--seed", "11", "--steps", "3", "--size", "64x48", "--scheduler", "euler_a", "--cfg", "6", "--clip-skip", "1",
              "--embeddings", str(exp / "embeddings")]  # fmt: skip
    assert cli.main([*common, "--lora", str(exp / "lora.safetensors"), "--out", str(tmp_path / "with")]) == 0
    (made,) = (tmp_path / "with").glob("*.png")
    diff = np.abs(pixels(made) - final).max()
    # The sample runs the LoRA unmerged, generation merges it into the weights: rounding may differ.
    assert diff <= 2, f"max abs difference {diff}/255"
    # the sample's own metadata, plus the run's exports, say the same
    assert cli.main(["generate", "--from-image", str(exp / "samples" / f"step-{MAX_STEPS}" / "00.png"), "--lora",
                     str(exp / "lora.safetensors"), "--embeddings", str(exp / "embeddings"), "--out", str(tmp_path / "from")]) == 0  # fmt: skip
    (again,) = (tmp_path / "from").glob("*.png")
    assert np.array_equal(pixels(again), pixels(made))
    assert cli.main([*common, "--out", str(tmp_path / "without")]) == 0
    (base,) = (tmp_path / "without").glob("*.png")
    assert np.abs(pixels(base) - final).max() > 8, "the trained LoRA made no visible difference; the check proves nothing"


def test_isolation_restores_modes_rng_and_word_counts() -> None:
    class Counting:
        uses = {"w": 1}

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # mixed modes come back as they were
    encoder = Counting()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with isolated_from_training([model], encoder):
        assert not model.training and not model[1].training
        torch.rand(10), random.random(), np.random.rand(4)
        encoder.uses["w"] += 3
    assert model.training and not model[0].training and model[1].training
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert encoder.uses == {"w": 1}


@pytest.mark.parametrize("sample, message", [
    ({"prompts": ["x"], "scheduler": "dpm2m"}, "sample.scheduler: unknown scheduler 'dpm2m'. Did you mean 'dpm++_2m'?"),
    ({"prompts": ["x"], "size": "64x50"}, "sample.size: size 64x50: width and height must be positive multiples of 8"),
    ({"prompts": ["a {pt1}"]}, "sample.prompts: prompt 0 ('a {pt1}') has {pt1} but word_names does not fill it"),
    ({"prompts": []}, "sample.prompts: list at least one prompt"),
    ({"prompts": ["x"], "every": -1}, "sample.every: must be at least 0"),
    ({"prompts": ["x"], "sizes": "64"}, "sample.sizes: unknown key. Did you mean 'size'"),
])  # fmt: skip
def test_sample_config_errors(sample, message) -> None:
    raw = {"model": {"pretrained": "m"}, "data": {"d": {"sources": [{"type": "image_folder", "img_root": "x"}],
                                                        "bucket": {"type": "fixed", "target_size": [64, 64]}}}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        hcp_core.build_pipeline({**raw, "sample": sample})
    assert message in str(err.value)


def test_out_of_memory_while_sampling_skips_the_samples_not_the_run(demo_model_dir, tmp_path, monkeypatch, caplog) -> None:
    from hcp_core.config.schema import SampleConfig
    from hcp_plugins.models.stable_diffusion.loading import load_models
    from hcp_core.models.text_encoding import PromptEncoder
    from hcp_core.train import sample_images as sampling

    models = load_models(demo_model_dir)
    models.unet.train()
    sampler = sampling.SampleRenderer(SampleConfig(prompts=["x"], every=5), models=models, exp_dir=tmp_path,
                                       prompt_encoder=PromptEncoder(models.tokenizer, models.text_encoder),
                                       default_size=(64, 64))  # fmt: skip
    assert [s for s in range(1, 21) if sampling.sample_due(sampler.config, s, max_steps=20)] == [5, 10, 15]  # the end samples on its own

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sampling, "render_image", no_memory)
    monkeypatch.setattr(logging.getLogger("hcp"), "propagate", True)  # a run in this process turns it off
    assert sampler.sample(5) == []
    assert "samples of step 5 skipped: out of memory" in caplog.text
    assert models.unet.training and not (tmp_path / "samples" / "step-5").exists()
