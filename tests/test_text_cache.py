"""Text-encoder outputs computed once: fixed prompts only, cached rows stack to the live batch."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from hcp_core.errors import ConfigError
from hcp_core.interfaces import ImageRecord, PromptParts
from hcp_core.models.text_encoding import EncodedPrompts
from hcp_core.train.text_cache import CachedPromptEncoder, fixed_prompts


class _Encoder:
    """A deterministic stand-in for a T5/CLIP encoder: fixed-length outputs per prompt."""

    calls = 0

    def __call__(self, prompts):
        _Encoder.calls += 1
        seeds = [sum(map(ord, p)) for p in prompts]
        hidden = torch.stack([torch.randn(6, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return EncodedPrompts(hidden=hidden, pooled=hidden.mean(1))


class _Shuffle:
    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        tags = parts.caption.split(", ")
        rng.shuffle(tags)
        return PromptParts(template=parts.template, caption=", ".join(tags))


def _prepared(**kw):
    records = [ImageRecord(image=f"{i}.png", size=(64, 64), caption=f"cat {i}, red", **kw) for i in range(3)]
    return {"ds": SimpleNamespace(records=records)}


def test_cached_batches_equal_live_batches_and_encode_each_prompt_once() -> None:
    prompts = fixed_prompts(_prepared(templates=("a photo of {caption}",)))
    assert prompts == ["a photo of cat 0, red", "a photo of cat 1, red", "a photo of cat 2, red"]
    live = _Encoder()
    _Encoder.calls = 0
    cached = CachedPromptEncoder(live, prompts + prompts, device="cpu", batch_size=2)
    assert _Encoder.calls == 3 and len(cached.rows) == 3  # the empty prompt (a row's structure), then 2 batches
    batch = [prompts[2], prompts[0], prompts[2]]
    got, want = cached(batch), live(batch)
    assert isinstance(got, EncodedPrompts)
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.pooled, want.pooled)
    with pytest.raises(KeyError, match="not in the text cache"):
        cached(["never seen"])


def test_prompts_that_change_between_epochs_cannot_be_cached() -> None:
    with pytest.raises(ConfigError, match=r"data\.ds change from epoch to epoch.*0\.png"):
        fixed_prompts(_prepared(text_transforms=(_Shuffle(),)))
    with pytest.raises(ConfigError, match="several templates"):
        fixed_prompts(_prepared(templates=("a {caption}", "the {caption}")))


def test_a_family_without_fixed_shape_prompts_refuses_the_cache(tmp_path, demo_model_dir, demo_data_dir) -> None:
    from hcp_core.config import load_config
    from hcp_core.errors import UserError
    from hcp_core.train.setup import cached_text
    from train_support import pipeline_toml, write_pipeline

    p = load_config(write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1)))
    with pytest.raises(UserError, match="model.cache_text: the sd family does not support caching"):
        cached_text(p, SimpleNamespace(), None, None, None, wrapped=False, train_text=False, device="cpu")


def _sd_encoder(model_dir):
    from hcp_plugins.models.stable_diffusion import StableDiffusionFamily

    family = StableDiffusionFamily()
    return family.prompt_encoder(family.load(str(model_dir)))


LONG = "a photo of " + ", ".join(f"red cat number {i} on a blue chair" for i in range(18))  # 3 chunks


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_chunked_clip_prompts_cache_per_chunk_count_and_pad_like_the_live_batch(model, demo_model_dir, sdxl_model_dir) -> None:
    """SD/SDXL encodings grow by 77-token chunks: prompts are cached in groups of one chunk count,
    and a batch pads its shorter rows with the empty prompt's chunk, as live encoding pads."""
    encoder = _sd_encoder(demo_model_dir if model == "sd" else sdxl_model_dir)
    middle = " ".join(LONG.split()[:60])
    prompts = ["a cat", LONG, "a dog on a mat", middle]
    counts = [encoder.chunk_count(x) for x in prompts]
    assert counts[0] == counts[2] == 1 and counts[1] == 3 and counts[3] == 2
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return encoder(batch)

    with torch.no_grad():
        CachedPromptEncoder(counting, prompts, device="cpu", batch_size=8)
        assert calls == [1, 4]  # the empty prompt; a plain function has no chunk_count: one group
        calls.clear()
        counting.chunk_count = encoder.chunk_count
        cached = CachedPromptEncoder(counting, prompts, device="cpu", batch_size=8)
        assert sorted(calls) == [1, 1, 1, 2]  # groups of 1, 3 and 2 chunks, then the empty prompt
        for batch in (["a cat", LONG], [middle, "a dog on a mat", "a cat"], ["a cat", "a dog on a mat"], [LONG, middle]):
            got, want = cached(batch), encoder(batch)
            if model == "sd":
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0), batch
            else:
                assert got.hidden.shape == want.hidden.shape
                assert torch.allclose(got.hidden, want.hidden, atol=1e-5, rtol=0), batch
                assert torch.allclose(got.pooled, want.pooled, atol=1e-5, rtol=0), batch


def test_cached_text_trains_an_sd_lora_like_live_encoding_and_a_rerun_reuses_it(tmp_path, demo_model_dir,
                                                                                  demo_data_dir) -> None:
    import re

    import hcp_core
    from train_support import assert_same_tensors, pipeline_toml, trained_tensors, write_pipeline

    runs = {}
    for name, cache in (("cached", "true"), ("live", "false")):
        cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / name, max_steps=2),
                             f"{name}.toml")
        hcp_core.run(hcp_core.load_config(cfg, [f"model.cache_text={cache}"]))
        runs[name] = trained_tensors(tmp_path / name)
    assert_same_tensors(runs["cached"], runs["live"], exact=False, atol=1e-6)
    first = re.search(r"text encoder outputs of (\d+) prompts cached \((\d+) reused", (tmp_path / "cached" / "train.log").read_text())
    assert first and int(first.group(1)) > 0 and first.group(2) == "0"
    stored = list((tmp_path / "cached" / "text_cache").rglob("*.safetensors"))
    assert len(stored) == int(first.group(1))
    # --overwrite keeps the text cache: the same run again encodes nothing and trains the same.
    hcp_core.run(hcp_core.load_config(tmp_path / "cached.toml", ["model.cache_text=true"]), overwrite=True)
    again = re.search(r"\((\d+) reused", (tmp_path / "cached" / "train.log").read_text())
    assert again and again.group(1) == first.group(1)
    assert_same_tensors(trained_tensors(tmp_path / "cached"), runs["cached"])


def test_stored_encodings_are_reused_only_under_the_same_fingerprint(tmp_path, demo_model_dir) -> None:
    from hcp_plugins.models.stable_diffusion import StableDiffusionFamily

    from hcp_core.train.text_cache import TextStore, text_fingerprint

    family = StableDiffusionFamily()
    models = family.load(str(demo_model_dir))
    encoder = family.prompt_encoder(models)
    prompts = ["a cat", LONG, "a dog"]
    calls = []

    def counting(batch):
        calls.append(list(batch))
        return encoder(batch)

    counting.chunk_count = encoder.chunk_count
    store = TextStore(str(tmp_path / "cache"))
    first = CachedPromptEncoder(counting, prompts, device="cpu", store=store)
    assert first.reused == 0 and sorted(map(len, calls)) == [1, 1, 2]  # "", the 3-chunk prompt, the two short ones
    calls.clear()
    second = CachedPromptEncoder(counting, prompts, device="cpu", store=store)
    assert second.reused == 3 and calls == [[""]]  # only the empty prompt, encoded live every time
    for batch in (["a cat", LONG], ["a dog"]):
        assert torch.equal(second(batch), first(batch))

    base = text_fingerprint(models, encoder, "no")
    assert text_fingerprint(models, encoder, "no") == base
    assert text_fingerprint(models, encoder, "bf16") != base
    assert text_fingerprint(models, family.prompt_encoder(models, clip_skip=1), "no") != base
    with torch.no_grad():
        next(models.text_encoder.parameters()).view(-1)[0] += 1.0  # a changed weight
    assert text_fingerprint(models, encoder, "no") != base


def test_cached_text_with_prompt_emphasis_is_refused_by_check(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    from hcp_core import cli
    from train_support import pipeline_toml, write_pipeline

    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert cli.main(["check", str(cfg), "model.cache_text=true", "model.prompt_emphasis=true"]) == 2
    assert "model.cache_text: cannot be used with model.prompt_emphasis" in capsys.readouterr().err
