"""PromptEncoder: CLIP skip and webui-style chunks, against independent computations."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from hcp_core.errors import ConfigError
from hcp_core.models.text_encoding import PromptEncoder, final_layer_norm

LONG = "red circle, " * 30  # 3 tokens per repeat: 90 tokens, two chunks


@pytest.fixture(scope="module")
def parts(demo_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(demo_model_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(demo_model_dir / "text_encoder")).eval()
    return tokenizer, text_encoder


def plain_ids(tokenizer, prompts):
    """What a plain SD pipeline feeds the encoder: one window, truncated and padded to 77."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


@torch.no_grad()
def test_clip_skip_0_is_last_hidden_state(parts):
    tokenizer, te = parts
    prompts = ["a red circle, blue background", "masterpiece, 1girl"]
    got = PromptEncoder(tokenizer, te, clip_skip=0)(prompts)
    assert torch.equal(PromptEncoder(tokenizer, te).tokenize(prompts), plain_ids(tokenizer, prompts))
    assert torch.allclose(got, te(plain_ids(tokenizer, prompts)).last_hidden_state, atol=1e-6)


@torch.no_grad()
def test_clip_skip_1_is_penultimate_layer_through_final_norm(parts):
    tokenizer, te = parts
    ids = plain_ids(tokenizer, ["a photo of a cat on the sofa"])
    got = PromptEncoder(tokenizer, te, clip_skip=1).encode(ids)
    hidden_states = te(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(got, te.final_layer_norm(hidden_states[-2]), atol=1e-6)
    # Independently: the same model with its last layer removed.
    shorter = copy.deepcopy(te)
    shorter.encoder.layers = shorter.encoder.layers[:-1]
    assert torch.allclose(got, shorter(ids).last_hidden_state, atol=1e-5)
    assert not torch.allclose(got, te(ids).last_hidden_state, atol=1e-3)


@torch.no_grad()
def test_long_prompt_in_two_chunks(parts):
    tokenizer, te = parts
    enc = PromptEncoder(tokenizer, te)
    ids = enc.tokenize(LONG)
    assert ids.shape == (1, 154)
    content = tokenizer(LONG, add_special_tokens=False).input_ids
    assert len(content) == 90
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0, :77].tolist() == [bos] + content[:75] + [eos]
    assert ids[0, 77:].tolist() == [bos] + content[75:] + [eos] + [tokenizer.pad_token_id] * 60
    hidden = enc.encode(ids)
    assert hidden.shape == (1, 154, 32)
    # The first chunk is what plain truncation to the first 75 tokens gives.
    assert torch.allclose(hidden[:, :77], te(plain_ids(tokenizer, [LONG])).last_hidden_state, atol=1e-6)
    rest = torch.tensor([[bos] + content[75:] + [eos] + [tokenizer.pad_token_id] * 60])
    assert torch.allclose(hidden[:, 77:], te(rest).last_hidden_state, atol=1e-6)


@torch.no_grad()
def test_batch_pads_short_prompts_with_empty_chunks(parts):
    tokenizer, te = parts
    enc = PromptEncoder(tokenizer, te, clip_skip=1)
    hidden = enc(["a cat", LONG])
    assert hidden.shape == (2, 154, 32)
    expected = enc.encode(plain_ids(tokenizer, ["a cat", ""]))
    assert torch.allclose(hidden[0, :77], expected[0], atol=1e-6)
    assert torch.allclose(hidden[0, 77:], expected[1], atol=1e-6)  # the empty chunk


def test_cut_with_warning(parts, caplog):
    tokenizer, te = parts
    enc = PromptEncoder(tokenizer, te, max_chunks=1)
    with caplog.at_level(logging.WARNING, logger="hcp_core.models.text_encoding"):
        ids = enc.tokenize(LONG)
    assert ids.shape == (1, 77)
    assert "15 tokens dropped" in caplog.text and "max_chunks=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hcp_core.models.text_encoding"):
        assert PromptEncoder(tokenizer, te, max_chunks=2).tokenize(LONG).shape == (1, 154)
    assert caplog.text == ""


def test_gradients_reach_the_text_encoder(parts):
    tokenizer, te = parts
    trained = copy.deepcopy(te).requires_grad_(True)
    enc = PromptEncoder(tokenizer, trained, clip_skip=1)
    enc([LONG, "a dog"]).square().mean().backward()
    grad = trained.embeddings.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert final_layer_norm(trained).weight.grad.abs().sum() > 0


@torch.no_grad()
def test_pooled_output_is_the_first_chunks(parts):
    tokenizer, te = parts
    enc = PromptEncoder(tokenizer, te)
    out = enc.encode_with_pooled(enc.tokenize(["a cat", LONG]))
    expected = te(plain_ids(tokenizer, ["a cat", LONG])).pooler_output
    assert out.pooled.shape == (2, 32)
    assert torch.allclose(out.pooled, expected, atol=1e-6)


@torch.no_grad()
def test_encoder_with_projection_and_nested_final_norm(parts):
    """SDXL's second encoder (and transformers 4) keep the final norm under ``text_model.``."""
    from hcp_core.demo.model import tiny_text_encoder

    tokenizer, te = parts
    torch.manual_seed(0)
    projected = tiny_text_encoder(tokenizer.get_vocab(), with_projection=True).eval()
    assert final_layer_norm(projected) is projected.text_model.final_layer_norm
    ids = plain_ids(tokenizer, ["a red circle"])
    out = PromptEncoder(tokenizer, projected, clip_skip=2).encode_with_pooled(ids)
    reference = projected(ids, output_hidden_states=True)
    assert torch.allclose(out.hidden, projected.text_model.final_layer_norm(reference.hidden_states[-3]), atol=1e-6)
    assert torch.allclose(out.pooled, reference.text_embeds, atol=1e-6)
    raw = PromptEncoder(tokenizer, projected, clip_skip=1, norm_after_skip=False).encode(ids)
    assert torch.allclose(raw, reference.hidden_states[-2], atol=1e-6)


def test_clip_skip_out_of_range(parts):
    tokenizer, te = parts
    with pytest.raises(ConfigError, match=r"model.clip_skip = 4 is out of range.*between 0 and 3"):
        PromptEncoder(tokenizer, te, clip_skip=4)
