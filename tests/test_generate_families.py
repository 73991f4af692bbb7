"""``hcp generate`` and ``hcp tools merge-lora`` through model families, on the tiny FLUX demo:
detection and ``--family``, PNG metadata, a FLUX LoRA (transformer + CLIP) applied as diffusers'
``load_lora_weights`` applies it, merged folders that ``FluxPipeline.from_pretrained`` loads, and
the SD/SDXL-only options refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcp_core import cli
from hcp_core.errors import UserError
from hcp_core.generation.generate import load_for_generation
from hcp_core.generation.metadata import read_png_params, read_png_text
from hcp_core.models.family import load_with_family
from hcp_core.tools.merge_lora import merge_lora, write_part

PROMPT = "a red square on a blue background"
SEED, STEPS, CFG = 3, 2, 3.5
CALL = ["-p", PROMPT, "--seed", str(SEED), "--steps", str(STEPS), "--cfg", str(CFG), "--size", "64x64"]


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, (str, Path)) else path_or_image
    return np.asarray(image.convert("RGB")).astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def hcp_generate(model: Path, out: Path, *args: str) -> Path:
    assert cli.main(["generate", "--model", str(model), "--out", str(out), *CALL, *map(str, args)]) == 0
    (image,) = out.glob("*.png")
    return image


def pipeline_image(pipe) -> np.ndarray:
    """What diffusers' FluxPipeline renders for the test's prompt and settings."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]  # fmt: skip
    return pixels(image)


@pytest.fixture(scope="module")
def flux_lora(flux_model_dir, tmp_path_factory) -> Path:
    """A FLUX LoRA file as training exports it (transformer attention and CLIP layers), its
    factors moved well off their start so that it changes the image."""
    from hcp_core.interfaces import AdapterContext
    from hcp_plugins.adapters.lora.adapter import build_lora_adapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    exp = tmp_path_factory.mktemp("flux_lora")
    _family, bundle = load_with_family(str(flux_model_dir))
    context = AdapterContext(exp_dir=str(exp), resolution=(64, 64), seed=3, extra={"lora": {}, "max_steps": 1})
    adapter = build_lora_adapter({
        "transformer": [LoraGroupConfig(layers=[r"re:.*attn\.(to_q|to_k|to_v)$"], rank=2, alpha=2.0, lr=1e-4)],
        "text_encoder": [LoraGroupConfig(layers=[r"re:.*self_attn\.(q_proj|v_proj)$"], rank=2, alpha=2.0, lr=1e-4)],
    }, context=context)  # fmt: skip
    adapter.attach(bundle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in (layer.branch.up.weight, layer.branch.down.weight):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    [path] = adapter.export(bundle, str(exp), None)
    return Path(path)


@pytest.fixture(scope="module")
def with_lora_in_diffusers(flux_model_dir, flux_lora) -> np.ndarray:
    """The reference: FluxPipeline.from_pretrained(demo) + load_lora_weights(file)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_model_dir))
    pipe.load_lora_weights(str(flux_lora))
    return pipeline_image(pipe)


# --------------------------------------------------------------------------- hcp generate
def test_load_with_family_detects_or_takes_the_family(flux_model_dir, demo_model_dir) -> None:
    family, models = load_with_family(str(flux_model_dir))
    assert type(family).__name__ == "FluxFamily" and models.kind == "flux" and models.unet is None
    family, models = load_with_family(str(demo_model_dir), family="sd")
    assert type(family).__name__ == "StableDiffusionFamily" and models.kind == "sd"
    with pytest.raises(UserError, match="unknown model family 'flx'.*Did you mean 'flux'"):
        load_with_family(str(flux_model_dir), family="flx")


def test_generate_renders_flux_with_its_parameters_inside(flux_model_dir, tmp_path) -> None:
    image = hcp_generate(flux_model_dir, tmp_path / "out")
    assert image.name == f"00000-{SEED}.png" and pixels(image).shape == (64, 64, 3) and pixels(image).std() > 0
    chunks = read_png_text(image)
    assert "parameters" in chunks and "hcp" in chunks
    params = read_png_params(image)
    assert (params.prompt, params.seed, params.steps, params.cfg, params.width, params.height) == (PROMPT, SEED, STEPS, CFG, 64, 64)
    assert params.model == str(flux_model_dir.resolve())
    # --family flux names what detection finds: the same image; and the image's metadata renders it again
    named = hcp_generate(flux_model_dir, tmp_path / "named", "--family", "flux")
    assert np.array_equal(pixels(named), pixels(image))
    assert cli.main(["generate", "--from-image", str(image), "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(again), pixels(image))


def test_generate_equals_flux_pipeline(flux_model_dir, tmp_path) -> None:
    from diffusers import FluxPipeline

    image = hcp_generate(flux_model_dir, tmp_path / "out")
    assert max_diff(pixels(image), pipeline_image(FluxPipeline.from_pretrained(str(flux_model_dir)))) <= 1


def test_a_flux_lora_applies_as_diffusers_load_lora_weights(flux_model_dir, flux_lora, with_lora_in_diffusers,
                                                            tmp_path) -> None:
    keys = list(load_file(str(flux_lora)))
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    base = hcp_generate(flux_model_dir, tmp_path / "base")
    with_lora = hcp_generate(flux_model_dir, tmp_path / "lora", "--lora", flux_lora)
    assert max_diff(pixels(with_lora), pixels(base)) > 8, "the LoRA made no visible difference; the checks prove nothing"
    # diffusers runs the LoRA unmerged: rounding may differ
    assert max_diff(pixels(with_lora), with_lora_in_diffusers) <= 1
    assert [(s.path, s.weight) for s in read_png_params(with_lora).loras] == [(str(flux_lora.resolve()), 1.0)]


def test_flux_generation_refuses_sd_only_options_by_name(flux_model_dir, tmp_path, capsys) -> None:
    base = ["generate", "--model", str(flux_model_dir), "-p", "x", "--steps", "1", "--out", str(tmp_path / "out")]
    (tmp_path / "embs").mkdir()
    cases = [
        (["--clip-skip", "1", "--size", "64x64"], "--clip-skip 1: this flux model has no CLIP skip"),
        (["--scheduler", "euler_a", "--size", "64x64"], "scheduler 'euler_a' (hcp generate --scheduler) is a DDPM "
                                                         "sampler; FLUX samples with its flow-matching Euler"),
        (["--size", "72x64"], "--size 72x64: this flux model renders sizes whose sides are multiples of 16"),
        (["--family", "fluxx"], "unknown model family 'fluxx'"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli.main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not list((tmp_path / "out").glob("*.png"))


# --------------------------------------------------------------------------- custom words
WORD_PROMPT = "a photo of mycat on a table"


def word_vectors(model_dir: Path, part: str, rows: int = 2) -> torch.Tensor:
    """Random vectors [rows, dim] for the CLIP in ``model_dir/part``, as large as its token vectors."""
    dim = json.loads((model_dir / part / "config.json").read_text())["hidden_size"]
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(len(part))) * 0.5


def test_flux_custom_words_render_as_diffusers_load_textual_inversion(flux_model_dir, tmp_path) -> None:
    from diffusers import FluxPipeline

    from hcp_core.models.custom_words import write_embedding

    file = write_embedding(tmp_path / "embs" / "mycat.safetensors", "mycat", word_vectors(flux_model_dir, "text_encoder"))
    with_word = hcp_generate(flux_model_dir, tmp_path / "hcp", "-p", WORD_PROMPT, "--embeddings", file.parent)
    plain = hcp_generate(flux_model_dir, tmp_path / "plain", "-p", WORD_PROMPT)
    assert max_diff(pixels(with_word), pixels(plain)) > 8, "the word made no visible difference"
    assert read_png_params(with_word).embeddings == (str(file.parent.resolve()),)
    # diffusers: the word's two vectors become tokens "mycat", "mycat_1" of CLIP-L; T5 reads the text
    pipe = FluxPipeline.from_pretrained(str(flux_model_dir))
    pipe.load_textual_inversion(str(file), token="mycat")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(WORD_PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]  # fmt: skip
    assert max_diff(pixels(with_word), pixels(reference)) <= 1


def test_sd3_custom_words_render_as_tokens_added_to_both_clips(sd3_model_dir, tmp_path) -> None:
    """StableDiffusion3Pipeline has no load_textual_inversion: the reference adds the word's tokens to
    both CLIP tokenizers and its vectors to both embedding tables by hand (T5 gets the plain prompt)."""
    from diffusers import StableDiffusion3Pipeline

    from hcp_core.models.custom_words import write_embedding

    vectors = {p: word_vectors(sd3_model_dir, p) for p in ("text_encoder", "text_encoder_2")}
    file = write_embedding(tmp_path / "embs" / "mycat.safetensors", "mycat", vectors)
    image = hcp_generate(sd3_model_dir, tmp_path / "hcp", "-p", WORD_PROMPT, "--embeddings", file.parent)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_model_dir))
    for tokenizer, encoder, part in ((pipe.tokenizer, pipe.text_encoder, "text_encoder"),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, "text_encoder_2")):
        tokenizer.add_tokens(["mycat", "mycat_1"])
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[-2:] = vectors[part]
    pipe.set_progress_bar_config(disable=True)
    expanded = WORD_PROMPT.replace("mycat", "mycat mycat_1")
    reference = pipe(expanded, prompt_3=WORD_PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG,
                     width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]  # fmt: skip
    assert max_diff(pixels(image), pixels(reference)) <= 1
    plain = hcp_generate(sd3_model_dir, tmp_path / "plain", "-p", WORD_PROMPT)
    assert max_diff(pixels(image), pixels(plain)) > 8, "the word made no visible difference"


# --------------------------------------------------------------------------- gen-from-prompts
def test_gen_from_prompts_on_flux_equals_flux_pipeline_per_image(flux_model_dir, tmp_path, capsys) -> None:
    from diffusers import FluxPipeline

    from hcp_core.tools.gen_from_prompts import image_seed

    prompts = ["a red circle", "a blue square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "reg"
    base = ["tools", "gen-from-prompts", "--model", str(flux_model_dir), "--prompt-file", str(tmp_path / "prompts.txt"),
            "--out", str(out), "--num", "2", "--batch-size", "2", "--steps", str(STEPS), "--cfg", str(CFG), "--seed", "5"]
    for args, message in ((["--width", "72", "--height", "64"], "--width/--height 72x64: this flux model renders sizes "
                                                                 "whose sides are multiples of 16"),
                          (["--sampler", "dpm++"], "--sampler dpm++_2m is a DDPM sampler; FLUX samples with its flow-matching Euler")):
        assert cli.main([*base, *args, *(["--width", "64", "--height", "64"] if "--sampler" in args else [])]) == 2
        assert message in capsys.readouterr().err
    assert cli.main([*base, "--width", "64", "--height", "64", "--sampler", "euler"]) == 0  # nothing was recorded
    pipe = FluxPipeline.from_pretrained(str(flux_model_dir))
    pipe.set_progress_bar_config(disable=True)
    for i in range(2):
        caption = (out / f"{i:06d}.txt").read_text().strip()
        reference = pipe(caption, num_inference_steps=STEPS, guidance_scale=CFG, width=64, height=64,
                         generator=torch.Generator("cpu").manual_seed(image_seed(5, i))).images[0]  # fmt: skip
        assert max_diff(pixels(out / f"{i:06d}.png"), pixels(reference)) <= 1, i
    assert sorted((out / f"{i:06d}.txt").read_text().strip() for i in range(2)) == sorted(prompts)


def test_fp16_is_not_the_default_for_flux_on_cuda(flux_model_dir) -> None:
    loaded = load_for_generation(str(flux_model_dir), device="cpu", log_fn=lambda _m: None)
    assert loaded.dtype == "fp32" and loaded.models.transformer.dtype == torch.float32
    assert loaded.native_size() == (1024, 1024)  # diffusers' FLUX default: 128 latents a side


# --------------------------------------------------------------------------- merge-lora
@pytest.fixture(scope="module")
def merged(flux_model_dir, flux_lora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "flux-merged"
    assert cli.main(["tools", "merge-lora", "--model", str(flux_model_dir), "--lora", str(flux_lora), "--out", str(out)]) == 0
    return out


def test_merged_flux_folder_loads_in_flux_pipeline_and_renders_like_the_lora(merged, with_lora_in_diffusers,
                                                                           flux_model_dir) -> None:
    from diffusers import FluxPipeline

    assert json.loads((merged / "model_index.json").read_text()) == json.loads((flux_model_dir / "model_index.json").read_text())
    assert max_diff(pipeline_image(FluxPipeline.from_pretrained(str(merged))), with_lora_in_diffusers) <= 1


def test_merge_rewrites_only_the_changed_parts_in_their_stored_types(merged, flux_model_dir) -> None:
    def weights(folder: Path):
        return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*.safetensors")}

    src, out = weights(flux_model_dir), weights(merged)
    assert src.keys() == out.keys()
    for name in src:
        same = src[name].read_bytes() == out[name].read_bytes()
        assert same == (name.split("/")[0] in ("vae", "text_encoder_2")), name  # the LoRA touched transformer and CLIP
        with safe_open(str(src[name]), "pt") as a, safe_open(str(out[name]), "pt") as b:
            # CLIP is written under the standard text_model.* names (see test_lora_merge.py); the rest as stored
            prefix = "text_model." if name.startswith("text_encoder/") and not a.keys()[0].startswith("text_model.") else ""
            assert {prefix + k for k in a.keys()} == set(b.keys()), name
            for key in a.keys():
                assert a.get_slice(key).get_dtype() == b.get_slice(prefix + key).get_dtype(), (name, key)


def test_a_large_part_is_written_in_shards_that_diffusers_reads(flux_model_dir, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    _family, models = load_with_family(str(flux_model_dir))
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text((flux_model_dir / "transformer" / "config.json").read_text())
    written = write_part(models.transformer, "transformer", folder, {}, shard_bytes=200_000)
    names = sorted(p.name for p in written)
    assert "diffusion_pytorch_model.safetensors.index.json" in names and len(names) > 2
    loaded = FluxTransformer2DModel.from_pretrained(str(folder))
    for key, value in models.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_merge_lora_refuses_a_flux_single_file(flux_model_dir, flux_lora, tmp_path) -> None:
    with pytest.raises(UserError, match="--single-file: flux models have no single-file layout"):
        merge_lora(flux_model_dir, [(str(flux_lora), 1.0)], tmp_path / "out", single_file=tmp_path / "flux.safetensors")
    assert not (tmp_path / "out").exists()


def test_merge_keeps_a_bf16_transformer_in_bf16(flux_model_dir, flux_lora, tmp_path) -> None:
    import shutil

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    src = tmp_path / "bf16"
    shutil.copytree(flux_model_dir, src)
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))
    out = merge_lora(src, [(str(flux_lora), 0.5)], tmp_path / "out", family="flux")
    merged = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == load_file(str(weights)).keys() and {v.dtype for v in merged.values()} == {torch.bfloat16}
    base = load_file(str(weights))
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(".attn.to_" in k and k.endswith(".weight") for k in changed)
    FluxTransformer2DModel.from_pretrained(str(out / "transformer"))  # loads
