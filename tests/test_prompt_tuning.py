"""Prompt tuning: custom-word files, prompt expansion, the embedding module, the adapter in real runs,
and the DreamBooth example."""
from __future__ import annotations

import copy
import os
import pickle
import shutil
from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core import plugins
from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext
from hcp_core.models.custom_words import (
    CustomWordPromptEncoder,
    EmbeddingFileError,
    install_custom_words,
    load_embeddings,
    read_embedding,
    write_embedding,
)
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.models.text_encoding import PromptEncoder
from hcp_core.train.runner import build_run, train
from hcp_plugins.adapters.prompt_tuning.adapter import PromptTuningAdapter
from hcp_plugins.adapters.prompt_tuning.config import PromptTuningConfig, TrainedWord
from train_support import REPO, pipeline_toml, trained_tensors, write_pipeline


@pytest.fixture
def registry():
    """The process registry (the built-in plugin registers ``prompt_tuning``)."""
    reg = plugins.get_registry()
    assert "prompt_tuning" in reg.adapters
    return reg


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    """The demo model's parts (do not modify: install words into a copy of the text encoder)."""
    return load_models(demo_model_dir)


def words_of(dim: int, seed: int = 0, **sizes: int):
    gen = torch.Generator().manual_seed(seed)
    return {name.replace("_", "-"): torch.randn(n, dim, generator=gen) * 0.5 for name, n in sizes.items()}


def reference_encoder(text_encoder, words, ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
    """Independent computation: grow the token table with the words' rows (what diffusers'
    load_textual_inversion does) and run the plain model on the same ids."""
    ref = copy.deepcopy(text_encoder)
    table = ref.get_input_embeddings().weight.data
    rows = torch.cat(list(words.values()))
    ref.resize_token_embeddings(table.shape[0] + rows.shape[0])
    ref.get_input_embeddings().weight.data[table.shape[0]:] = rows
    out = ref(input_ids=ids, output_hidden_states=True)
    if clip_skip:
        return ref.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    return out.last_hidden_state


# --------------------------------------------------------------------------- files
def test_embedding_files_round_trip_in_both_layouts(tmp_path) -> None:
    vectors = torch.randn(3, 8)
    pt = write_embedding(tmp_path / "my-cat.pt", "my-cat", vectors, step=12)
    st = write_embedding(tmp_path / "my-cat.safetensors", "my-cat", vectors)
    a1111 = torch.load(pt, weights_only=True)
    assert a1111["name"] == "my-cat" and a1111["step"] == 12
    assert torch.equal(a1111["string_to_param"]["*"], vectors)
    assert list(load_file(str(st))) == ["my-cat"] and torch.equal(load_file(str(st))["my-cat"], vectors)
    assert torch.equal(read_embedding(pt), vectors) and torch.equal(read_embedding(st), vectors)
    assert list(load_embeddings(tmp_path)) == ["my-cat"]  # one word, two files that agree
    # diffusers' learned_embeds.bin: {token: [dim]}
    torch.save({"<tok>": torch.ones(8)}, tmp_path / "tok.bin")
    assert read_embedding(tmp_path / "tok.bin").shape == (1, 8)

    write_embedding(tmp_path / "My-Cat.safetensors", "My-Cat", vectors + 1)  # the same word (case), other vectors
    (tmp_path / "my-cat.safetensors").unlink()
    with pytest.raises(EmbeddingFileError, match=r"'My-Cat' is defined twice with different vectors: .*My-Cat\.safetensors and .*my-cat\.pt"):
        load_embeddings(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickled_objects_are_never_unpickled(tmp_path) -> None:
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"string_to_param": {"*": torch.zeros(1, 4)}, "x": _Payload()}, f, protocol=2)
    with pytest.raises(EmbeddingFileError, match="cannot be read safely.*weights_only=True"):
        read_embedding(bad)


# --------------------------------------------------------------------------- prompts and vectors
def test_words_expand_in_place_case_insensitively_as_whole_words(demo) -> None:
    te = copy.deepcopy(demo.text_encoder)
    words = words_of(te.config.hidden_size, my_cat=3, my_cat_toy=2)
    handle = install_custom_words(te, words)
    enc = CustomWordPromptEncoder.wrap(PromptEncoder(demo.tokenizer, te), handle)
    plain = PromptEncoder(demo.tokenizer, demo.text_encoder).token_ids
    base = te.get_input_embeddings().num_embeddings
    cat, toy = [base, base + 1, base + 2], [base + 3, base + 4]
    assert handle.ids == {"my-cat": cat, "my-cat-toy": toy}
    assert enc.token_ids("a photo of My-Cat on the sofa") == plain("a photo of") + cat + plain("on the sofa")
    assert enc.token_ids("my-cat-toy, my-cat") == toy + plain(",") + cat  # the longest name wins
    assert enc.token_ids("my-catx mmy-cat") == plain("my-catx mmy-cat")  # not whole words
    assert enc.uses == {"my-cat": 2, "my-cat-toy": 1}


def test_a_word_never_straddles_two_prompt_windows(demo) -> None:
    te = copy.deepcopy(demo.text_encoder)
    handle = install_custom_words(te, words_of(te.config.hidden_size, my_cat=3))
    enc = CustomWordPromptEncoder.wrap(PromptEncoder(demo.tokenizer, te), handle)
    prompt = "red " * 73 + "my-cat blue"
    ids = enc.tokenize([prompt])[0].tolist()
    word = handle.ids["my-cat"]
    red, blue = enc.token_ids("red")[0], enc.token_ids("blue")[0]
    # window 1: BOS, 73 x red, then closed like a short prompt (EOS, pad), and the window's EOS
    assert ids[:77] == [enc.bos_id] + [red] * 73 + [enc.eos_id, enc.pad_id, enc.eos_id]
    assert ids[77:83] == [enc.bos_id] + word + [blue, enc.eos_id]  # window 2 starts with the whole word
    # a word that fits is not moved
    fits = enc.tokenize(["red " * 72 + "my-cat"])[0].tolist()
    assert fits[:77] == [enc.bos_id] + [red] * 72 + word + [enc.eos_id]


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_encoding_matches_a_model_with_the_words_in_its_table(demo, clip_skip) -> None:
    te = copy.deepcopy(demo.text_encoder)
    words = words_of(te.config.hidden_size, my_cat=3, pt_x=1)
    handle = install_custom_words(te, words)
    enc = CustomWordPromptEncoder.wrap(PromptEncoder(demo.tokenizer, te, clip_skip=clip_skip), handle)
    prompts = ["a photo of a my-cat on the sofa, pt-x", "pt-x " * 80 + "my-cat"]  # the second takes 2 windows
    ids = enc.tokenize(prompts)
    with torch.no_grad():
        ours = enc.encode(ids)
        ref = reference_encoder(demo.text_encoder, words, ids.reshape(-1, 77), clip_skip).reshape(ours.shape)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # without custom words in the prompt, the output is the plain model's
    with torch.no_grad():
        plain = PromptEncoder(demo.tokenizer, demo.text_encoder, clip_skip=clip_skip)(["a photo of a cat"])
        assert torch.equal(enc(["a photo of a cat"]), plain)
    handle.remove()
    assert type(te.get_input_embeddings()) is torch.nn.Embedding


def test_grads_reach_only_the_trained_word_when_the_text_encoder_is_frozen(demo) -> None:
    te = copy.deepcopy(demo.text_encoder)
    te.requires_grad_(False)
    handle = install_custom_words(te, words_of(te.config.hidden_size, my_cat=3, fixed=2), trainable=["my-cat"])
    # the engine decides to run the text encoder with grad from its own parameters
    assert [n for n, p in te.named_parameters() if p.requires_grad] == ["embeddings.token_embedding.words.vectors.0"]
    enc = CustomWordPromptEncoder.wrap(PromptEncoder(demo.tokenizer, te), handle)
    enc(["a my-cat and a fixed thing"]).square().sum().backward()
    params = handle.params
    assert params["my-cat"].grad is not None and bool((params["my-cat"].grad.abs().sum(dim=1) > 0).all())
    assert params["fixed"].grad is None
    assert all(p.grad is None for n, p in te.named_parameters() if "words" not in n)


# --------------------------------------------------------------------------- the adapter
def test_training_an_unknown_word_is_a_config_error_listing_the_words(tmp_path, demo) -> None:
    emb = tmp_path / "embs"
    for name in ("alpha", "beta"):
        write_embedding(emb / f"{name}.pt", name, torch.zeros(1, demo.text_encoder.config.hidden_size))
    cfg = PromptTuningConfig(emb_dir="embs", train=[TrainedWord(name="gamma")])
    adapter = PromptTuningAdapter({"text_encoder": [cfg]}, context=AdapterContext(exp_dir=str(tmp_path), base_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.train\[0\]\.name: no custom word 'gamma' in .*embs; words found: alpha, beta"):
        adapter.attach(attrs.evolve(demo, text_encoder=copy.deepcopy(demo.text_encoder)))
    missing = PromptTuningAdapter({"text_encoder": [PromptTuningConfig(emb_dir="nowhere")]},
                                  context=AdapterContext(exp_dir=str(tmp_path), base_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.emb_dir: folder .*nowhere does not exist.*create-embedding"):
        missing.attach(attrs.evolve(demo, text_encoder=copy.deepcopy(demo.text_encoder)))


def test_config_validation(registry) -> None:
    raw = {"model": {"pretrained": "m"}, "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "x"}],
                                                        "bucket": {"type": "fixed", "target_size": [64, 64]}}}}
    ok = hcp_core.build_pipeline({**raw, "tokenizer_pt": {"emb_dir": "e", "train": [{"name": "a", "lr": 0.01}]}})
    assert ok.adapters["tokenizer_pt"] == [PromptTuningConfig(emb_dir="e", train=[TrainedWord("a", 0.01)])]
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.train\[0\]\.lr: must be greater than 0(.|\n)*"
                                          r"tokenizer_pt\.emb: unknown key\. Did you mean 'emb_dir'"):
        hcp_core.build_pipeline({**raw, "tokenizer_pt": {"train": [{"name": "a", "lr": 0}], "emb": 1}})
    with pytest.raises(ConfigError, match=r"tokenizer_pt\.train: word 'A' is listed twice"):
        hcp_core.build_pipeline({**raw, "tokenizer_pt": {"train": [{"name": "a"}, {"name": "A"}]}})


def pt_pipeline(tmp_path: Path, model: Path, data: Path, *, adapters: str, steps: int = 2) -> str:
    """The demo pipeline with the template using custom words (one through template_fill)."""
    text = pipeline_toml(model, data, tmp_path / "exp", max_steps=steps, adapters=adapters)
    text = text.replace('prompt_template = "a picture of {caption}"',
                        'prompt_template = "a picture of {pt1} with old-one, {caption}"\n'
                        'text_transforms = [{ type = "template_fill", word_names = { pt1 = "my-cat" } }]')
    return text.replace('scheduler = { type = "cosine", warmup_steps = 1 }', 'scheduler = { type = "constant" }')


def make_words(emb: Path, model: Path) -> dict:
    from hcp_core.tools.create_embedding import create_embedding

    create_embedding(str(model), "my-cat", 3, init_text="cat, *[0.02, 2]", out=str(emb), seed=1)
    create_embedding(str(model), "old-one", 2, out=str(emb), fmt="safetensors", seed=2)
    return {p.name: p.read_bytes() for p in emb.iterdir()}


def test_a_run_trains_only_the_listed_word(tmp_path, registry, demo, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # emb_dir is relative to the working directory
    files = make_words(tmp_path / "embs", demo_model_dir)
    start = load_embeddings(tmp_path / "embs")
    lora = "[[lora_unet]]\nlr = 1e-3\nrank = 2\nlayers = ['re:.*\\.attn2$']\n"
    pt = '[tokenizer_pt]\nemb_dir = "embs"\ntrain = [{ name = "my-cat", lr = 0.05 }]\n'
    cfg = write_pipeline(tmp_path, pt_pipeline(tmp_path, demo_model_dir, demo_data_dir, adapters=lora + pt))
    pipeline = hcp_core.load_config(cfg, ["model.clip_skip=1"])
    trainer = build_run(pipeline)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["tokenizer_pt.my-cat"] == 0.05 and not any("old-one" in n for n in groups)
    try:
        result = train(trainer)
    finally:
        trainer.close()
    exp = Path(result.exp_dir)

    te = trainer.models.text_encoder
    fresh = load_models(demo_model_dir).text_encoder
    assert torch.equal(te.get_input_embeddings().weight, fresh.get_input_embeddings().weight), "the token table changed"
    params = te.get_input_embeddings().words
    trained = dict(zip(params.names, params.vectors))
    assert torch.equal(trained["old-one"], start["old-one"]), "a word not listed in train changed"
    assert not torch.allclose(trained["my-cat"], start["my-cat"]), "the trained word did not change"
    assert {k for k in trained_tensors(exp) if k.startswith("prompt_tuning/")} == {"prompt_tuning/my-cat"}
    for suffix in (".pt", ".safetensors"):
        assert torch.equal(read_embedding(exp / "embeddings" / f"my-cat{suffix}"), trained["my-cat"].detach())
    assert not (exp / "embeddings" / "old-one.pt").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "embs").iterdir()} == files, "replace = false changed emb_dir"


def test_alongside_a_finetune_group_and_replace_writes_back(tmp_path, registry, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_words(tmp_path / "embs", demo_model_dir)
    adapters = ("[[text_encoder]]\nlr = 1e-3\nlayers = ['encoder.layers.3']\n"
                '[tokenizer_pt]\nemb_dir = "embs"\nreplace = true\ntrain = [{ name = "my-cat", lr = 0.05 }]\n')
    cfg = write_pipeline(tmp_path, pt_pipeline(tmp_path, demo_model_dir, demo_data_dir, adapters=adapters))
    result = hcp_core.run(hcp_core.load_config(cfg))
    exp = Path(result.exp_dir)
    final = read_embedding(exp / "embeddings" / "my-cat.safetensors")
    assert torch.equal(read_embedding(tmp_path / "embs" / "my-cat.pt"), final), "replace did not write emb_dir"
    assert torch.load(tmp_path / "embs" / "my-cat.pt", weights_only=True)["step"] == 2
    assert (exp / "embeddings" / "step-2" / "my-cat.pt").is_file()  # the checkpoint-time export
    tensors = trained_tensors(exp)
    assert "prompt_tuning/my-cat" in tensors and any(k.startswith("finetune/text_encoder.encoder.layers.3") for k in tensors)


def test_words_alone_train_and_resume_exactly(tmp_path, registry, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    """Only [tokenizer_pt]: the text encoder is frozen but for the word; a resumed run ends the same."""
    monkeypatch.chdir(tmp_path)
    make_words(tmp_path / "embs", demo_model_dir)
    adapters = '[tokenizer_pt]\nemb_dir = "embs"\ntrain = [{ name = "my-cat", lr = 0.05 }]\n'
    text = pt_pipeline(tmp_path, demo_model_dir, demo_data_dir, adapters=adapters, steps=3).replace(
        "save_every = 0", "save_every = 1")
    cfg = write_pipeline(tmp_path, text)
    whole = Path(hcp_core.run(hcp_core.load_config(cfg)).exp_dir)
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "embeddings")
    shutil.rmtree(again / "checkpoints" / "step-00000003")
    hcp_core.run(hcp_core.load_config(cfg, [f'exp_dir="{again}"']), resume=str(again / "checkpoints" / "step-00000002"))
    final = load_file(str(whole / "embeddings" / "my-cat.safetensors"))["my-cat"]
    assert torch.equal(load_file(str(again / "embeddings" / "my-cat.safetensors"))["my-cat"], final)
    assert not torch.equal(final, read_embedding(tmp_path / "embs" / "my-cat.pt"))


# --------------------------------------------------------------------------- DreamBooth example
def test_dreambooth_example_runs_on_the_demo(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    from hcp_core.tools.gen_from_prompts import main as gen_main

    (tmp_path / "demo").mkdir()
    os.symlink(demo_model_dir, tmp_path / "demo" / "model")
    shutil.copytree(demo_data_dir, tmp_path / "demo" / "data")
    monkeypatch.chdir(tmp_path)
    assert gen_main(["--model", "demo/model", "--prompt", "a picture of a shape", "--out", "demo/reg", "--num", "2",
                     "--steps", "2", "--width", "64", "--height", "64"]) == 0
    pipeline = hcp_core.load_config(REPO / "examples" / "dreambooth.toml",
                                    ["train.max_steps=2", "train.save_every=0", f'exp_dir="{tmp_path / "run"}"'])
    assert set(pipeline.data) == {"instance", "reg"} and pipeline.data["reg"].loss_weight == 1.0
    result = hcp_core.run(pipeline)
    assert result.step == 2 and (tmp_path / "run" / "finetune.safetensors").is_file()


def test_mixed_precision_words_keep_fp32_grads(demo) -> None:
    """As under mixed precision: frozen table and word in bf16, the trained word in fp32."""
    te = copy.deepcopy(demo.text_encoder)
    te.requires_grad_(False)
    handle = install_custom_words(te, words_of(te.config.hidden_size, my_cat=2, fixed=1), trainable=["my-cat"])
    for p in te.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    base = te.get_input_embeddings().num_embeddings
    out = te.get_input_embeddings()(torch.tensor([[5, base, base + 1, base + 2]]))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, 1:3], handle.params["my-cat"].detach().to(torch.bfloat16))
    assert torch.equal(out[0, 3], handle.params["fixed"][0])
    out.float().sum().backward()
    assert handle.params["my-cat"].grad.dtype == torch.float32 and bool((handle.params["my-cat"].grad != 0).all())
