"""Custom words (``[tokenizer_pt]``) on the flow-matching families: FLUX (words in CLIP-L only,
SD 1.x file layouts) and SD3 (words in CLIP-L and CLIP-G, ``{clip_l, clip_g}`` files). T5 is never
prompt-tuned: it reads a word's name as written. Created with the tool, expanded like a grown
vocabulary, trained, exported, resumed exactly; FLUX words load in diffusers' FluxPipeline."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import hcp_core
from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext
from hcp_core.models.custom_word_files import SD_PARTS, SDXL_PARTS, EmbeddingFileError, parts_of, read_word_file
from hcp_core.models.custom_words import install_word_sets, load_word_sets, wrap_for_words, write_embedding
from hcp_core.tools.create_embedding import create_embedding
from hcp_core.tools.create_embedding import main as create_embedding_main
from hcp_plugins.adapters.prompt_tuning.adapter import PromptTuningAdapter
from hcp_plugins.adapters.prompt_tuning.config import PromptTuningConfig, TrainedWord
from test_flux_family import FIXED_64, RATIO_BUCKET
from train_support import assert_same_tensors, pipeline_toml, trained_tensors, write_pipeline

PROMPTS = ["a photo of my-cat on the sofa", "my-cat, best quality, my-cat"]
WORD_RUN = """
[tokenizer_pt]
emb_dir = "{emb_dir}"
train = [{{ name = "my-cat", lr = 0.05 }}]
"""
#: The CLIP parts that hold a word's vectors, and the ids keys of the family's tokenize().
CLIP_PARTS = {"flux": SD_PARTS, "sd3": SDXL_PARTS}
CLIP_IDS = {"flux": ("clip",), "sd3": ("clip", "clip_2")}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def family(name: str) -> Any:
    if name == "flux":
        from hcp_plugins.models.config import FluxConfig
        from hcp_plugins.models.flux import FluxFamily

        return FluxFamily(FluxConfig(max_sequence_length=32))
    from hcp_plugins.models.config import SD3Config
    from hcp_plugins.models.sd3 import SD3Family

    return SD3Family(SD3Config(max_sequence_length=32))


@pytest.fixture(scope="module")
def loaded(flux_model_dir, sd3_model_dir) -> Dict[str, Any]:
    """Both demo models, loaded once (read-only: deep-copy a text encoder before installing words)."""
    return {"flux": family("flux").load(str(flux_model_dir)), "sd3": family("sd3").load(str(sd3_model_dir))}


def model_dir(name: str, flux_model_dir: Path, sd3_model_dir: Path) -> Path:
    return flux_model_dir if name == "flux" else sd3_model_dir


def fresh_copy(models: Any) -> Any:
    """A bundle whose text encoders may be changed (transformer and VAE shared, unused here)."""
    out = copy.copy(models)
    for part in TEXT_ENCODERS:
        if getattr(models, part, None) is not None:
            setattr(out, part, copy.deepcopy(getattr(models, part)))
    return out


def random_word(models: Any, parts: Tuple[str, ...], n: int, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {part: torch.randn(n, models.part(part).config.hidden_size, generator=gen) for part in parts}


# --------------------------------------------------------------------------- which encoders
def test_words_live_in_the_clip_encoders_only(loaded) -> None:
    assert parts_of(loaded["flux"]) == SD_PARTS  # CLIP-L; text_encoder_2 is T5
    assert parts_of(loaded["sd3"]) == SDXL_PARTS  # CLIP-L, CLIP-G; text_encoder_3 is T5
    for name in ("flux", "sd3"):
        encoder = family(name).prompt_encoder(loaded[name])
        assert len(encoder.encoders) == len(CLIP_PARTS[name]) and encoder.uses is None


# --------------------------------------------------------------------------- prompts
def reference(name: str, models: Any, words: Dict[str, Dict[str, torch.Tensor]], prompts) -> Any:
    """Independent computation: each CLIP's tokenizer and token table grown with the word's rows
    (tokens my-cat, my-cat_1, ...), as diffusers' load_textual_inversion does; the plain family
    encoder then encodes CLIP ids of the expanded prompts and T5 ids of the prompts as written."""
    ref = fresh_copy(models)
    expanded = list(prompts)
    tokenizers = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for part in CLIP_PARTS[name]:
        setattr(ref, tokenizers[part], copy.deepcopy(getattr(models, tokenizers[part])))
    for word, sets in words.items():
        tokens = [word] + [f"{word}_{i}" for i in range(1, sets["text_encoder"].shape[0])]
        expanded = [p.replace(word, " ".join(tokens)) for p in expanded]
        for part in CLIP_PARTS[name]:
            tok = getattr(ref, tokenizers[part])
            tok.add_tokens(tokens)
            encoder = ref.part(part)
            encoder.resize_token_embeddings(len(tok))
            with torch.no_grad():
                encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)] = sets[part]
    plain = family(name).prompt_encoder(ref)
    ids = dict(plain.tokenize(prompts))
    grown = plain.tokenize(expanded)
    for key in CLIP_IDS[name]:
        ids[key] = grown[key]
    with torch.no_grad():
        return plain.encode(ids)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_words_expand_in_the_clips_like_a_grown_vocabulary_and_t5_reads_the_name(loaded, name) -> None:
    words = {"my-cat": random_word(loaded[name], CLIP_PARTS[name], 3, seed=2)}
    models = fresh_copy(loaded[name])
    installed = install_word_sets(models, words)
    assert list(installed) == list(CLIP_PARTS[name])
    encoder = wrap_for_words(family(name).prompt_encoder(models), installed)
    with torch.no_grad():
        ours = encoder(PROMPTS)
        plain = family(name).prompt_encoder(loaded[name])(PROMPTS)
    theirs = reference(name, loaded[name], words, PROMPTS)
    torch.testing.assert_close(ours.hidden, theirs.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, theirs.pooled, rtol=0, atol=1e-5)
    assert encoder.uses == {"my-cat": 3}
    t5 = slice(None) if name == "flux" else slice(77, None)  # FLUX: all T5; SD3: after the 77 CLIP tokens
    assert torch.equal(ours.hidden[:, t5], plain.hidden[:, t5])  # T5 saw "my-cat" as written
    assert not torch.allclose(ours.pooled, plain.pooled, atol=1e-4)  # ... and CLIP the word's vectors
    ids = encoder.tokenize(PROMPTS)
    first_placeholder = models.text_encoder.get_input_embeddings().num_embeddings
    assert int(ids["clip"].max()) == first_placeholder + 2 and int(ids["t5"].max()) < first_placeholder
    # the family's encoder is unchanged: the wrapper is a copy
    assert not hasattr(family(name).prompt_encoder(models).encoders[0], "words")


def test_flux_reads_sd_layouts_and_comfyui_clip_l_files_and_refuses_others(loaded, tmp_path) -> None:
    vectors = random_word(loaded["flux"], SD_PARTS, 2, seed=3)["text_encoder"]
    write_embedding(tmp_path / "a.pt", "a", vectors)  # A1111
    save_file({"clip_l": vectors}, str(tmp_path / "b.safetensors"))  # ComfyUI's key for FLUX's CLIP-L
    words = load_word_sets(tmp_path, parts_of(loaded["flux"]))
    assert torch.equal(words["a"]["text_encoder"], vectors) and torch.equal(words["b"]["text_encoder"], vectors)
    save_file({"clip_l": vectors, "t5xxl": torch.zeros(2, 8)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"c.safetensors holds vectors for other text encoders too \(t5xxl\)"):
        read_word_file(tmp_path / "c.safetensors", SD_PARTS)
    save_file({"clip_l": vectors, "clip_g": torch.zeros(2, 48)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"is an SDXL embedding"):
        read_word_file(tmp_path / "d.safetensors", SD_PARTS)


def test_a_one_clip_word_in_an_sd3_run_is_a_config_error(sd3_model_dir, loaded, tmp_path) -> None:
    write_embedding(tmp_path / "embs" / "old.pt", "old", torch.zeros(1, 32))
    adapter = PromptTuningAdapter({"text_encoder": [PromptTuningConfig(emb_dir="embs")]},
                                  context=AdapterContext(exp_dir=str(tmp_path / "exp"), base_dir=str(tmp_path)))  # fmt: skip
    with pytest.raises(ConfigError, match=r"tokenizer_pt.emb_dir: custom word file .*old.pt holds one vector set"):
        adapter.attach(fresh_copy(loaded["sd3"]))


# --------------------------------------------------------------------------- create-embedding
def test_create_embedding_makes_clip_vectors_only(flux_model_dir, sd3_model_dir, loaded, tmp_path, capsys) -> None:
    path, vectors, _ = create_embedding(str(flux_model_dir), "my-cat", 2, init_text="cat", out=str(tmp_path / "f"),
                                        fmt="safetensors", seed=0)  # fmt: skip
    assert list(load_file(str(path))) == ["my-cat"] and vectors.shape == (2, 32)  # the SD layout: {name: [N, dim]}
    table = loaded["flux"].text_encoder.get_input_embeddings().weight
    cat = loaded["flux"].tokenizer("cat", add_special_tokens=False).input_ids
    assert torch.equal(vectors[: len(cat)], table[cat][:2])
    assert create_embedding_main([str(sd3_model_dir), "my-dog", "3", "--out", str(tmp_path / "s"), "--seed", "1"]) == 0
    assert "'my-dog': 3 x 32 (clip_l) + 3 x 48 (clip_g) vectors" in capsys.readouterr().out
    sets = read_word_file(tmp_path / "s" / "my-dog.pt", SDXL_PARTS)
    assert sets["text_encoder"].shape == (3, 32) and sets["text_encoder_2"].shape == (3, 48)


# --------------------------------------------------------------------------- training
def word_pipeline(name: str, model: Path, data: Path, tmp_path: Path, exp: Path, **kw: Any) -> Path:
    emb_dir = tmp_path / "embs"
    if not emb_dir.exists():
        create_embedding(str(model), "my-cat", 2, init_text="cat", out=str(emb_dir), fmt="safetensors", seed=0)
    text = pipeline_toml(model, data, exp, adapters=WORD_RUN.format(emb_dir=emb_dir), **kw).replace(RATIO_BUCKET, FIXED_64)
    text = text.replace('prompt_template = "a picture of {caption}"', 'prompt_template = "a picture of my-cat, {caption}"')
    return write_pipeline(tmp_path, text, f"{exp.name}.toml")


@pytest.fixture(scope="module", params=["flux", "sd3"])
def word_run(request, flux_model_dir, sd3_model_dir, demo_data_dir, tmp_path_factory) -> Tuple[str, Path]:
    """A 4-step run of each family training custom word my-cat (checkpoints at steps 2 and 4)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"{name}_word_run")
    model = model_dir(name, flux_model_dir, sd3_model_dir)
    cfg = word_pipeline(name, model, demo_data_dir, tmp, tmp / "whole", max_steps=4, save_every=2)
    hcp_core.run(hcp_core.load_config(cfg))
    return name, tmp


def test_a_word_trains_exports_and_resumes_exactly(flux_model_dir, sd3_model_dir, demo_data_dir, loaded, word_run,
                                                   tmp_path) -> None:  # fmt: skip
    name, run = word_run
    parts = CLIP_PARTS[name]
    whole = run / "whole"
    start = read_word_file(run / "embs" / "my-cat.safetensors", parts)
    trained = read_word_file(whole / "embeddings" / "my-cat.safetensors", parts)
    for part in parts:
        assert trained[part].shape == start[part].shape
        assert (trained[part] - start[part]).abs().max() > 1e-3, f"{part}'s vectors did not train"
    state = trained_tensors(whole)  # the word's vectors only: the token tables and T5 never train
    if name == "flux":
        assert sorted(state) == ["prompt_tuning/my-cat"]
        assert torch.equal(state["prompt_tuning/my-cat"], trained["text_encoder"])
        export = sorted(p.name for p in (whole / "embeddings").iterdir())
        assert export == ["my-cat.pt", "my-cat.safetensors", "step-2", "step-4"]
        assert list(load_file(str(whole / "embeddings" / "my-cat.safetensors"))) == ["my-cat"]
        assert torch.equal(read_word_file(whole / "embeddings" / "my-cat.pt")["text_encoder"], trained["text_encoder"])
    else:
        assert sorted(state) == ["prompt_tuning/my-cat.clip_g", "prompt_tuning/my-cat.clip_l"]
        assert torch.equal(state["prompt_tuning/my-cat.clip_g"], trained["text_encoder_2"])
        assert sorted(p.name for p in (whole / "embeddings").iterdir()) == ["my-cat.safetensors", "step-2", "step-4"]
        assert sorted(load_file(str(whole / "embeddings" / "my-cat.safetensors"))) == ["clip_g", "clip_l"]

    # what trained: the word's Parameters alone (one group); the token tables and T5 stay frozen
    models = fresh_copy(loaded[name])
    adapter = PromptTuningAdapter({"text_encoder": [PromptTuningConfig(emb_dir=str(run / "embs"), train=[TrainedWord("my-cat")])]},
                                  context=AdapterContext(exp_dir=str(tmp_path / "exp"), base_dir=str(tmp_path)))  # fmt: skip
    groups = adapter.attach(models)
    assert len(groups) == 1 and [tuple(p.shape) for p in groups[0]["params"]] == [tuple(start[p].shape) for p in parts]
    trains = {n for n, m in models.modules().items() for prm in m.parameters() if prm.requires_grad}
    assert trains == set(parts)
    for part in parts:
        table = models.part(part).get_input_embeddings()
        assert not table.weight.requires_grad and torch.equal(table.weight, loaded[name].part(part).get_input_embeddings().weight)

    resumed = tmp_path / "resumed"
    shutil.copytree(run / "embs", tmp_path / "embs")
    model = model_dir(name, flux_model_dir, sd3_model_dir)
    cfg = word_pipeline(name, model, demo_data_dir, tmp_path, resumed, max_steps=4, save_every=2)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert hcp_core.run(hcp_core.load_config(cfg), resume="latest").step == 4
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), exact=True)
    for suffix in (".safetensors",) if name == "sd3" else (".safetensors", ".pt"):
        a = read_word_file(whole / "embeddings" / f"my-cat{suffix}", parts)
        b = read_word_file(resumed / "embeddings" / f"my-cat{suffix}", parts)
        assert all(torch.equal(a[p], b[p]) for p in parts)


@pytest.mark.parametrize("word_run", ["flux"], indirect=True)  # SD3's diffusers pipeline loads no words
def test_the_trained_flux_word_loads_in_diffusers_and_matches_hcp(flux_model_dir, loaded, word_run) -> None:
    name, run = word_run
    from diffusers import FluxPipeline

    export = run / "whole" / "embeddings" / "my-cat.safetensors"
    models = fresh_copy(loaded["flux"])
    encoder = wrap_for_words(family("flux").prompt_encoder(models),
                             install_word_sets(models, load_word_sets(export.parent, SD_PARTS)))  # fmt: skip
    pipe = FluxPipeline.from_pretrained(str(flux_model_dir), local_files_only=True)
    pipe.load_textual_inversion(str(export))  # the token is the file's key, "my-cat"; CLIP-L only
    with torch.no_grad():
        ours = encoder(PROMPTS)
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=32)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=1e-4)
