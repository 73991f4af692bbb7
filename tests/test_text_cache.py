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
    assert _Encoder.calls == 2 and len(cached.rows) == 3
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


def test_a_family_without_fixed_shape_prompts_refuses_the_cache(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    from hcp_core import cli
    from train_support import pipeline_toml, write_pipeline

    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert cli.main(["run", str(cfg), "model.cache_text=true"]) == 2
    assert "model.cache_text: the sd family does not support caching" in capsys.readouterr().err
