"""Prompt emphasis (``model.prompt_emphasis``): the webui syntax and the weighted hidden states."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hcp_core.errors import ConfigError
from hcp_core.models.emphasis import enable_emphasis, parse_emphasis, strip_emphasis
from hcp_core.models.text_encoding import PromptEncoder

X = 1.1


@pytest.mark.parametrize("prompt, runs", [
    ("a red cat", [("a red cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", X), (" cat", 1.0)]),
    ("a ((red)) cat", [("a ", 1.0), ("red", X * X), (" cat", 1.0)]),
    ("[cat]", [("cat", 1 / X)]),
    ("[[cat]]", [("cat", 1 / X / X)]),
    ("a (red:1.5) [cat]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / X)]),
    ("(a (b:2) c)", [("a ", X), ("b", 2 * X), (" c", X)]),
    ("(red: 0.5 )", [("red", 0.5)]),
    ("(red:.5)", [("red", 0.5)]),
    ("(red", [("red", X)]),  # left open: runs to the end
    ("a [b", [("a ", 1.0), ("b", 1 / X)]),
    ("a) b]", [("a) b]", 1.0)]),  # closers with no opener are text
    ("(a:b)", [("a:b", X)]),  # ":" without a number is text
    ("x:1.2)", [("x:1.2)", 1.0)]),  # an explicit weight needs its "("
    (r"\(literal\) \[too\] a\\b", [("(literal) [too] a\\b", 1.0)]),
    (r"(a\)b)", [("a)b", X)]),
    ("(a)(a)", [("aa", X)]),  # equal neighbours merge
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_parser(prompt, runs):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in runs]
    assert [w for _, w in got] == pytest.approx([w for _, w in runs], rel=1e-12)


def test_strip_removes_only_the_syntax():
    assert strip_emphasis("a (red:1.5) [cat], ((masterpiece))") == "a red cat, masterpiece"


@pytest.fixture(scope="module")
def clip(demo_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(demo_model_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(demo_model_dir / "text_encoder")).eval()
    # The demo's untrained final norm has zero bias, so its outputs average zero and "keep the
    # mean" would divide by about nothing; a trained CLIP's bias does not average zero.
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.copy_(torch.linspace(-0.1, 0.4, text_encoder.config.hidden_size))
    return tokenizer, text_encoder


def reference(tokenizer, text_encoder, runs, *, clip_skip=0):
    """Independently: tokens of each run, one 77-token window, hidden states times the weights,
    rescaled to the unweighted mean (the whole prompt, all channels)."""
    ids, weights = [], []
    for text, weight in runs:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    pad = 77 - len(ids) - 2
    window = torch.tensor([[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad])
    w = torch.tensor([[1.0] + weights + [1.0] * (pad + 1)])
    out = text_encoder(window, output_hidden_states=True)
    z = out.last_hidden_state if clip_skip == 0 else text_encoder.final_layer_norm(out.hidden_states[-2])
    weighted = z * w[..., None]
    return weighted * (z.mean() / weighted.mean()), ids


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sd_hidden_states_are_weighted_and_keep_their_mean(clip, clip_skip):
    tokenizer, te = clip
    prompt = "a (red:1.5) circle, [blue] ((background))"
    expected, ids = reference(tokenizer, te, [("a ", 1), ("red", 1.5), (" circle, ", 1), ("blue", 1 / X), (" ", 1),
                                              ("background", X * X)], clip_skip=clip_skip)
    # The runs tokenize to what the stripped text does.
    assert ids == tokenizer("a red circle, blue background", add_special_tokens=False).input_ids
    encoder = enable_emphasis(PromptEncoder(tokenizer, te, clip_skip=clip_skip))
    got = encoder([prompt, "another prompt (in the batch:0.3)"])
    torch.testing.assert_close(got[:1], expected, rtol=0, atol=1e-5)
    assert abs(got[0].mean() - expected.mean()) < 1e-6
    # Per prompt: the batch around it does not change it.
    torch.testing.assert_close(encoder(prompt), got[:1], rtol=0, atol=1e-6)
    # Without emphasis words in it, a prompt encodes as it always did.
    plain = PromptEncoder(tokenizer, te, clip_skip=clip_skip)
    torch.testing.assert_close(encoder("a red circle"), plain("a red circle"), rtol=0, atol=0)


@torch.no_grad()
def test_off_by_default_brackets_are_text(clip):
    tokenizer, te = clip
    encoder = PromptEncoder(tokenizer, te)
    ids = encoder.tokenize("a (red:1.5) cat")[0].tolist()
    assert ids[1:-1][: len(tokenizer("a (red:1.5) cat", add_special_tokens=False).input_ids)] == \
        tokenizer("a (red:1.5) cat", add_special_tokens=False).input_ids
    on = enable_emphasis(PromptEncoder(tokenizer, te))
    assert not torch.allclose(encoder("a (red:1.5) cat"), on("a (red:1.5) cat"))


def test_long_prompts_keep_weights_across_chunks(clip):
    tokenizer, te = clip
    encoder = enable_emphasis(PromptEncoder(tokenizer, te))
    ids, weights = encoder.tokenize_weighted("red, " * 40 + "(blue:2)")
    assert ids.shape == weights.shape == (1, 154)
    blue = tokenizer("blue", add_special_tokens=False).input_ids[0]
    where = (ids[0] == blue).nonzero().flatten().tolist()
    assert where == [77 + 1 + 80 - 75] and weights[0, where[0]] == 2.0
    assert weights[0].sum() == 153 + 2.0  # BOS, EOS and padding weigh 1


@torch.no_grad()
def test_sdxl_weights_each_encoder_and_leaves_pooled(sdxl_model_dir):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hcp_plugins.models.stable_diffusion.conditioning import SdxlPromptEncoder

    # Only the text side of the model is needed.
    m = SimpleNamespace(kind="sdxl", tokenizer=CLIPTokenizer.from_pretrained(str(sdxl_model_dir / "tokenizer")),
                        tokenizer_2=CLIPTokenizer.from_pretrained(str(sdxl_model_dir / "tokenizer_2")),
                        text_encoder=CLIPTextModel.from_pretrained(str(sdxl_model_dir / "text_encoder")).eval(),
                        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(sdxl_model_dir / "text_encoder_2")).eval())
    prompt = "a (red:1.4) circle on [blue]"
    plain = SdxlPromptEncoder(m)
    emph = enable_emphasis(SdxlPromptEncoder(m))
    got, base = emph(prompt), plain(prompt)
    torch.testing.assert_close(got.pooled, plain(strip_emphasis(prompt)).pooled, rtol=0, atol=0)
    (ids_1, ids_2), (w_1, w_2) = emph.tokenize_weighted(prompt)
    dims = m.text_encoder.config.hidden_size
    for i, (ids, w, part) in enumerate([(ids_1, w_1, got.hidden[..., :dims]), (ids_2, w_2, got.hidden[..., dims:])]):
        z = plain.encoders[i].encode(ids)  # unweighted, same layer as SDXL uses
        weighted = z * w[..., None]
        torch.testing.assert_close(part, weighted * (z.mean() / weighted.mean()), rtol=0, atol=1e-5)
    assert not torch.allclose(got.hidden, base.hidden)


def test_flow_families_refuse_emphasis():
    from hcp_plugins.models.flux import FluxFamily

    pipeline = SimpleNamespace(model=SimpleNamespace(prediction_type=None, clip_skip=0, prompt_emphasis=True),
                               train=SimpleNamespace(min_snr_gamma=None, noise_offset=0.0), sample=None)
    with pytest.raises(ConfigError, match="model.prompt_emphasis applies to the sd and sdxl families only"):
        FluxFamily().check_options(pipeline)
    with pytest.raises(ConfigError, match=r"model.prompt_emphasis = true: .*does not support emphasis"):
        enable_emphasis(SimpleNamespace(encoders=[]))


def test_a_run_trains_with_emphasis_flip_and_caption_dropout(tmp_path, demo_model_dir, demo_data_dir, monkeypatch):
    import hcp_core
    from hcp_core.models import text_encoding
    from train_support import pipeline_toml, write_pipeline

    seen = []
    original = text_encoding.apply_emphasis

    def spy(hidden, weights):
        seen.append(sorted({round(float(w), 4) for w in weights.flatten()}))
        return original(hidden, weights)

    monkeypatch.setattr(text_encoding, "apply_emphasis", spy)
    # 128 px buckets on the 64 px demo model: the run warns once, from the loaded model's config.
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1, masks=True, batch_size=1,
                         bucket='{ type = "fixed", target_size = [128, 128] }').replace(
        'prompt_template = "a picture of {caption}"',
        'prompt_template = "a (picture:1.3) of {caption}"\ntext_transforms = [{ type = "caption_dropout", p = 0.2 }]')
    cfg = write_pipeline(tmp_path, text)
    result = hcp_core.run(hcp_core.load_config(cfg, ["model.prompt_emphasis=true", "data.ds.flip=0.5"]))
    assert result.step == 1 and result.last_loss == result.last_loss
    assert seen and all(1.3 in s for s in seen)
    log = (tmp_path / "exp" / "train.log").read_text()
    assert log.count("data.ds: buckets up to 128x128 have 4.0x the pixels of the model's native 64x64") == 1
