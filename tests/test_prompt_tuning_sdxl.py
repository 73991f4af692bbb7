"""Custom words on SDXL: one vector set per text encoder ({clip_l, clip_g} files), created, trained,
resumed exactly, and loaded by diffusers' SDXL pipeline (one load_textual_inversion per encoder)."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hcp_core
from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext
from hcp_core.models.custom_words import (
    EmbeddingFileError,
    install_word_sets,
    load_word_sets,
    read_embedding,
    read_word_file,
    wrap_for_words,
    write_embedding,
)
from hcp_core.models.custom_word_files import SDXL_PARTS
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_plugins.models.stable_diffusion.conditioning import SdxlPromptEncoder
from hcp_core.tools.create_embedding import create_embedding
from hcp_plugins.adapters.prompt_tuning.adapter import PromptTuningAdapter
from hcp_plugins.adapters.prompt_tuning.config import PromptTuningConfig
from train_support import assert_same_tensors, hcp_env, pipeline_toml, trained_tensors, write_pipeline

PROMPTS = ["a photo of my-cat on the sofa", "my-cat, best quality, my-cat"]
WORD_RUN = """
[tokenizer_pt]
emb_dir = "{emb_dir}"
train = [{{ name = "my-cat", lr = 0.05 }}]
"""


@pytest.fixture(scope="module")
def xl(sdxl_model_dir):
    """The tiny SDXL model's parts (do not modify; deep-copy an encoder before installing words)."""
    return load_models(sdxl_model_dir)


def sdxl_word(xl, n: int, seed: int) -> dict:
    """Random vectors of ``n`` rows for each text encoder, unlike any token's."""
    gen = torch.Generator().manual_seed(seed)
    return {part: torch.randn(n, xl.part(part).config.hidden_size, generator=gen) for part in SDXL_PARTS}


def fresh_copy(xl):
    """A bundle whose text encoders may be changed (UNet and VAE shared, unused here)."""
    out = copy.copy(xl)
    out.text_encoder, out.text_encoder_2 = copy.deepcopy(xl.text_encoder), copy.deepcopy(xl.text_encoder_2)
    return out


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_word_files_hold_clip_l_and_clip_g(xl, tmp_path, suffix) -> None:
    vectors = sdxl_word(xl, 2, seed=1)
    path = write_embedding(tmp_path / f"w{suffix}", "w", vectors)
    raw = load_file(str(path)) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert sorted(raw) == ["clip_g", "clip_l"]  # nothing else: webui reads every entry as a tensor
    assert torch.equal(raw["clip_l"], vectors["text_encoder"]) and torch.equal(raw["clip_g"], vectors["text_encoder_2"])
    back = read_word_file(path, SDXL_PARTS)
    assert all(torch.equal(back[p], vectors[p]) for p in SDXL_PARTS)
    with pytest.raises(EmbeddingFileError, match=r"is an SDXL embedding \(clip_l / clip_g\)"):
        read_embedding(path)


def test_wrong_kind_and_mismatched_sets_are_named(xl, tmp_path) -> None:
    sd_file = write_embedding(tmp_path / "sd.pt", "sd", torch.zeros(2, 32))
    with pytest.raises(EmbeddingFileError, match=r"sd.pt holds one vector set .*\{clip_l: \[N, 768\], clip_g"):
        read_word_file(sd_file, SDXL_PARTS)
    save_file({"clip_l": torch.zeros(2, 32)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"half.safetensors has only clip_l"):
        read_word_file(tmp_path / "half.safetensors", SDXL_PARTS)
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 48)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"same number of vectors, got \{'clip_l': 2, 'clip_g': 3\}"):
        read_word_file(tmp_path / "odd.safetensors", SDXL_PARTS)
    # a word whose vectors do not fit an encoder's width names the word
    wide = {"text_encoder": torch.zeros(1, 33), "text_encoder_2": torch.zeros(1, 48)}
    with pytest.raises(EmbeddingFileError, match=r"'wide' has vectors of shape \(1, 33\).*size 32"):
        install_word_sets(fresh_copy(xl), {"wide": wide})


def test_create_embedding_makes_one_set_per_encoder_from_each_tokenizer(xl, sdxl_model_dir, tmp_path) -> None:
    path, vectors, _ = create_embedding(str(sdxl_model_dir), "my-cat", 3, init_text="cat", out=str(tmp_path),
                                        fmt="safetensors", seed=5)  # fmt: skip
    assert path == tmp_path / "my-cat.safetensors"
    sets = read_word_file(path, SDXL_PARTS)
    for part, tokenizer in (("text_encoder", xl.tokenizer), ("text_encoder_2", xl.tokenizer_2)):
        table = xl.part(part).get_input_embeddings().weight
        [cat] = tokenizer("cat", add_special_tokens=False).input_ids
        assert sets[part].shape == (3, table.shape[1])
        assert torch.equal(sets[part][0], table[cat]) and torch.equal(sets[part], vectors[part])
        assert not torch.equal(sets[part][1], sets[part][2])  # the padding rows are random


def test_create_embedding_cli_on_sdxl_says_both_shapes(sdxl_model_dir, tmp_path, capsys) -> None:
    from hcp_core import cli

    args = ["tools", "create-embedding", str(sdxl_model_dir), "my-dog", "2", "--out", str(tmp_path), "--seed", "1"]
    assert cli.main(args) == 0
    assert "'my-dog': 2 x 32 (clip_l) + 2 x 48 (clip_g) vectors" in capsys.readouterr().out
    sets = read_word_file(tmp_path / "my-dog.pt", SDXL_PARTS)  # --format pt: the same {clip_l, clip_g} dict
    assert sets["text_encoder"].shape == (2, 32) and sets["text_encoder_2"].shape == (2, 48)
    assert cli.main(args) == 2  # exists already: refused without --force
    assert "already exists" in capsys.readouterr().err


# --------------------------------------------------------------------------- prompts
def reference_hidden(xl, words: dict, prompts, clip_skip: int = 0) -> torch.Tensor:
    """Independent computation: grow each encoder's token table and tokenizer with the word's rows
    (placeholder tokens my-cat, my-cat_1, ...), as diffusers' load_textual_inversion does, and
    encode with the plain SDXL prompt encoder."""
    ref = fresh_copy(xl)
    ref.tokenizer, ref.tokenizer_2 = copy.deepcopy(xl.tokenizer), copy.deepcopy(xl.tokenizer_2)
    expanded = list(prompts)
    for name, sets in words.items():
        tokens = [name] + [f"{name}_{i}" for i in range(1, sets["text_encoder"].shape[0])]
        expanded = [p.replace(name, " ".join(tokens)) for p in expanded]
        for part, tok in (("text_encoder", ref.tokenizer), ("text_encoder_2", ref.tokenizer_2)):
            tok.add_tokens(tokens)
            encoder = ref.part(part)
            encoder.resize_token_embeddings(len(tok))
            with torch.no_grad():
                encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)] = sets[part]
    with torch.no_grad():
        return SdxlPromptEncoder(ref, clip_skip=clip_skip)(expanded).hidden


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_words_expand_in_both_encoders_like_a_grown_vocabulary(xl, clip_skip) -> None:
    words = {"my-cat": sdxl_word(xl, 3, seed=2)}
    models = fresh_copy(xl)
    encoder = wrap_for_words(SdxlPromptEncoder(models, clip_skip=clip_skip), install_word_sets(models, words))
    with torch.no_grad():
        ours = encoder(PROMPTS).hidden
    torch.testing.assert_close(ours, reference_hidden(xl, words, PROMPTS, clip_skip), rtol=0, atol=1e-5)
    assert encoder.uses == {"my-cat": 3}
    with torch.no_grad():  # each encoder's own vectors count: changing clip_g changes only encoder 2's half
        models.text_encoder_2.get_input_embeddings().words.vectors[0].mul_(2)
        changed = encoder(PROMPTS).hidden
    d1 = xl.text_encoder.config.hidden_size
    assert torch.equal(changed[..., :d1], ours[..., :d1]) and not torch.allclose(changed[..., d1:], ours[..., d1:])


# --------------------------------------------------------------------------- training
def word_pipeline(sdxl_model_dir, demo_data_dir, tmp_path, exp: Path, **kw) -> Path:
    emb_dir = tmp_path / "embs"
    if not emb_dir.exists():
        create_embedding(str(sdxl_model_dir), "my-cat", 2, init_text="cat", out=str(emb_dir), fmt="safetensors", seed=0)
    text = pipeline_toml(sdxl_model_dir, demo_data_dir, exp, adapters=WORD_RUN.format(emb_dir=emb_dir), **kw)
    text = text.replace('prompt_template = "a picture of {caption}"', 'prompt_template = "a picture of my-cat, {caption}"')
    return write_pipeline(tmp_path, text, f"{exp.name}.toml")


@pytest.fixture(scope="module")
def word_run(sdxl_model_dir, demo_data_dir, tmp_path_factory) -> Path:
    """A 4-step SDXL run training custom word my-cat (checkpoints at steps 2 and 4); its folder."""
    tmp = tmp_path_factory.mktemp("sdxl_word_run")
    cfg = word_pipeline(sdxl_model_dir, demo_data_dir, tmp, tmp / "whole", max_steps=4, save_every=2)
    hcp_core.run(hcp_core.load_config(cfg))
    return tmp


def test_a_word_trains_in_both_encoders_and_resumes_exactly(sdxl_model_dir, demo_data_dir, word_run, tmp_path) -> None:
    whole = word_run / "whole"
    start = read_word_file(word_run / "embs" / "my-cat.safetensors", SDXL_PARTS)
    trained = read_word_file(whole / "embeddings" / "my-cat.safetensors", SDXL_PARTS)
    for part in SDXL_PARTS:
        assert trained[part].shape == start[part].shape
        assert (trained[part] - start[part]).abs().max() > 1e-3, f"{part}'s vectors did not train"
    state = trained_tensors(whole)
    assert sorted(state) == ["prompt_tuning/my-cat.clip_g", "prompt_tuning/my-cat.clip_l"]
    assert torch.equal(state["prompt_tuning/my-cat.clip_g"], trained["text_encoder_2"])
    assert sorted(p.name for p in (whole / "embeddings").iterdir()) == ["my-cat.safetensors", "step-2", "step-4"]

    resumed = tmp_path / "resumed"
    shutil.copytree(word_run / "embs", tmp_path / "embs")
    cfg = word_pipeline(sdxl_model_dir, demo_data_dir, tmp_path, resumed, max_steps=4, save_every=2)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert hcp_core.run(hcp_core.load_config(cfg), resume="latest").step == 4
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), exact=True)


def test_sd_words_in_an_sdxl_run_are_a_config_error(sdxl_model_dir, tmp_path) -> None:
    write_embedding(tmp_path / "embs" / "old.pt", "old", torch.zeros(1, 32))
    adapter = PromptTuningAdapter({"text_encoder": [PromptTuningConfig(emb_dir="embs")]},
                                  context=AdapterContext(exp_dir=str(tmp_path / "exp"), base_dir=str(tmp_path)))  # fmt: skip
    with pytest.raises(ConfigError, match=r"tokenizer_pt.emb_dir: custom word file .*old.pt holds one vector set"):
        adapter.attach(load_models(sdxl_model_dir))


# --------------------------------------------------------------------------- diffusers
# A fresh interpreter with only diffusers: one load_textual_inversion per text encoder.
DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    model, word, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split("|")
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    state = load_file(word)
    pipe.load_textual_inversion(state["clip_l"], token="my-cat", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="my-cat", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    save_file({"embeds": embeds.contiguous(), "pooled": pooled.contiguous()}, out)
    """
)


def test_trained_word_loads_per_encoder_in_diffusers_and_matches_hcp(xl, sdxl_model_dir, word_run, tmp_path) -> None:
    export = word_run / "whole" / "embeddings" / "my-cat.safetensors"
    models = fresh_copy(xl)
    encoder = wrap_for_words(SdxlPromptEncoder(models), install_word_sets(models, load_word_sets(export.parent, SDXL_PARTS)))
    with torch.no_grad():
        ours = encoder(PROMPTS)
    out = tmp_path / "diffusers.safetensors"
    proc = subprocess.run([sys.executable, "-c", DIFFUSERS_SCRIPT, str(sdxl_model_dir), str(export), str(out), "|".join(PROMPTS)],
                          env=hcp_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(out))
    torch.testing.assert_close(theirs["embeds"], ours.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs["pooled"], ours.pooled, rtol=0, atol=1e-5)
    base = fresh_copy(xl)  # training mattered: the word's starting vectors condition otherwise
    start = wrap_for_words(SdxlPromptEncoder(base), install_word_sets(base, load_word_sets(word_run / "embs", SDXL_PARTS)))
    with torch.no_grad():
        assert not torch.allclose(start(PROMPTS).hidden, ours.hidden, atol=1e-4)


def test_load_word_sets_reads_a_folder_of_sdxl_words(xl, tmp_path) -> None:
    vectors = sdxl_word(xl, 1, seed=4)
    write_embedding(tmp_path / "a.safetensors", "a", vectors)
    write_embedding(tmp_path / "a.pt", "a", vectors)
    assert list(load_word_sets(tmp_path, SDXL_PARTS)) == ["a"]
    write_embedding(tmp_path / "a.pt", "a", sdxl_word(xl, 1, seed=5))
    with pytest.raises(EmbeddingFileError, match="defined twice with different vectors"):
        load_word_sets(tmp_path, SDXL_PARTS)
