"""SDXL rendering: ``hcp generate`` against diffusers' own SDXL pipeline (prompts, clip skip, LoRA
files), ``[sample]`` during an SDXL run, PNG metadata round trips, and the errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcp_core import cli
from hcp_core.generation.generate import load_for_generation
from hcp_core.generation.metadata import parse_parameters, read_png_params, read_png_text
from hcp_core.generation.params import GenerationParams
from hcp_core.generation.render import render_image
from hcp_core.models.custom_words import write_embedding
from train_support import assert_same_tensors, sample_toml, sampling_runs, trained_tensors

PROMPT = "a red circle on a blue background"
NEGATIVE = "lowres, blurry"
# Large learning rates: three steps must change every part visibly, or the LoRA checks prove nothing.
LORA_ALL_PARTS = """
[[lora_unet]]
lr = 5e-2
rank = 2
layers = ['re:.*\\.attn[12]$']

[[lora_text_encoder]]
lr = 5e-2
rank = 2
layers = ['re:.*self_attn$']

[[lora_text_encoder_2]]
lr = 5e-2
rank = 2
layers = ['re:.*self_attn$', 'text_projection']
"""
SAMPLE = sample_toml('["a red circle", "a blue square"]')
MAX_STEPS = 3


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB")).astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def model_dir(sdxl_model_dir) -> Path:
    return sdxl_model_dir


def diffusers_pipe(model_dir: Path, scheduler: str = "euler_a"):
    """diffusers' own SDXL pipeline from the folder, with one of diffusers' samplers."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), add_watermarker=False)
    cls = {"euler_a": EulerAncestralDiscreteScheduler, "dpm++_2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, *, prompt: str, seed: int, steps: int, cfg: float, size, **kwargs) -> np.ndarray:
    """diffusers' image for ``prompt`` (noise from a CPU generator seeded with ``seed``), as pixels."""
    width, height = size
    image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg,
                 width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]  # fmt: skip
    return pixels(image)


def diffusers_negative(pipe, negative_prompt: str, clip_skip: int) -> dict:
    """diffusers' keyword arguments for the negative prompt, encoded at hcp's layer.

    diffusers' SDXL pipeline applies ``clip_skip`` to the prompt only (the negative prompt keeps
    the penultimate layer); hcp uses the same layer for both, so with clip skip diffusers gets the
    negative prompt as embeddings from its own ``encode_prompt``.
    """
    if not clip_skip:
        return {"negative_prompt": negative_prompt}
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(negative_prompt, device="cpu", do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip)  # fmt: skip
    return {"negative_prompt_embeds": hidden, "negative_pooled_prompt_embeds": pooled}


def hcp_generate(model_dir: Path, out: Path, *args) -> Path:
    """``hcp generate`` in this process; the one image it wrote."""
    assert cli.main(["generate", "--model", str(model_dir), "--out", str(out), *map(str, args)]) == 0
    (image,) = out.glob("*.png")
    return image


@pytest.mark.parametrize("clip_skip, scheduler", [(0, "euler_a"), (1, "dpm++_2m")])
def test_generate_equals_diffusers_sdxl_pipeline(model_dir, tmp_path, clip_skip, scheduler) -> None:
    ours = pixels(hcp_generate(model_dir, tmp_path, "-p", PROMPT, "--negative-prompt", NEGATIVE, "--seed", 5, "--steps", 3,
                               "--cfg", 6.5, "--size", "64x48", "--scheduler", scheduler, "--clip-skip", clip_skip))  # fmt: skip
    pipe = diffusers_pipe(model_dir, scheduler)
    call = dict(prompt=PROMPT, seed=5, steps=3, cfg=6.5, size=(64, 48), clip_skip=clip_skip or None)
    theirs = diffusers_image(pipe, **call, **diffusers_negative(pipe, NEGATIVE, clip_skip))
    if clip_skip:  # the layer of the negative prompt matters: diffusers' plain call differs
        assert max_diff(ours, diffusers_image(pipe, **call, negative_prompt=NEGATIVE)) > 8
    assert ours.shape == (48, 64, 3) and theirs.std() > 0
    assert max_diff(ours, theirs) <= 1


def test_empty_negative_prompt_is_the_encoded_empty_string_not_zeros(model_dir) -> None:
    """hcp encodes an empty negative prompt as "" (as webui, and as SD generation); diffusers' SDXL
    pipeline does so for ``negative_prompt=""`` but uses zeros when it gets no negative prompt
    (``force_zeros_for_empty_prompt``, true in SDXL's model_index.json)."""
    loaded = load_for_generation(str(model_dir), device="cpu", log_fn=lambda _msg: None)
    params = GenerationParams(prompt=PROMPT, seed=3, steps=3, cfg=7.0, scheduler="euler_a", width=64, height=64)
    ours = pixels(render_image(loaded.models, loaded.encoder, params))
    pipe = diffusers_pipe(model_dir)
    assert pipe.config.force_zeros_for_empty_prompt
    call = dict(prompt=PROMPT, seed=3, steps=3, cfg=7.0, size=(64, 64))
    assert max_diff(ours, diffusers_image(pipe, **call, negative_prompt="")) <= 1
    assert max_diff(ours, diffusers_image(pipe, **call)) > 8, "zeros and the encoded empty prompt should differ"


def test_decoding_runs_outside_autocast_in_the_vaes_precision(model_dir) -> None:
    """Under a half-precision autocast (as in fp16 training), the UNet runs in half precision and
    the fp32 VAE in fp32 (SDXL's VAE overflows in fp16); afterwards the VAE is as it was."""
    loaded = load_for_generation(str(model_dir), device="cpu", log_fn=lambda _msg: None)
    m = loaded.models
    seen = {}

    def record(name):
        def hook(module, args, output) -> None:
            seen.setdefault(name, output.dtype)

        return hook

    hooks = [m.unet.conv_in.register_forward_hook(record("unet")), m.vae.decoder.conv_in.register_forward_hook(record("vae"))]
    params = GenerationParams(prompt=PROMPT, seed=1, steps=2, width=64, height=64)
    try:
        image = render_image(m, loaded.encoder, params, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"unet": torch.bfloat16, "vae": torch.float32}
    assert pixels(image).std() > 0
    assert "decode" not in vars(m.vae)  # the VAE's own decode again
    fp32 = pixels(render_image(m, loaded.encoder, params))
    assert max_diff(pixels(image), fp32) < 64  # bf16 denoising: close to, not equal to, fp32


def test_fp16_casts_every_part_but_a_vae_that_asks_for_fp32(model_dir, recwarn) -> None:
    """``--dtype fp16`` casts both text encoders and the UNet; SDXL's VAE (``force_upcast`` in its
    config) stays fp32, so it decodes as diffusers' pipeline would after upcasting it."""
    half = load_for_generation(str(model_dir), device="cpu", dtype="fp16", log_fn=lambda _msg: None)
    m = half.models
    assert m.vae.config.force_upcast and m.vae.dtype == torch.float32
    assert {part.dtype for part in (m.unet, m.text_encoder, m.text_encoder_2)} == {torch.float16}
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=2, steps=2, width=64, height=64)
    image = pixels(render_image(m, half.encoder, params))
    full = load_for_generation(str(model_dir), device="cpu", log_fn=lambda _msg: None)
    assert 0 < max_diff(image, pixels(render_image(full.models, full.encoder, params))) <= 8
    assert not [w for w in recwarn if "upcast_vae" in str(w.message)]  # diffusers never had to upcast it


# --------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, sdxl_model_dir, demo_data_dir):
    """The same SDXL LoRA run (UNet and both text encoders, clip skip 1) with and without ``[sample]``."""
    return sampling_runs(tmp_path_factory.mktemp("sdxl_runs"), sdxl_model_dir, demo_data_dir, adapters=LORA_ALL_PARTS,
                         sample=SAMPLE, max_steps=MAX_STEPS)


def test_sdxl_samples_and_training_unchanged_by_them(runs) -> None:
    samples = runs["sampled"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-2", "step-3"]
    for step in (2, 3):
        folder = samples / f"step-{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "grid.png"]
        first, second = pixels(folder / "00.png"), pixels(folder / "01.png")
        assert first.shape == (48, 64, 3) and first.std() > 0
        assert np.array_equal(pixels(folder / "grid.png"), np.concatenate([first, second], axis=1))
        params = parse_parameters(read_png_text(folder / "01.png")["parameters"])
        assert (params["prompt"], params["seed"], params["Training step"]) == ("a blue square", 12, str(step))
    assert max_diff(pixels(samples / "step-2" / "00.png"), pixels(samples / "step-3" / "00.png")) > 0
    assert not (runs["plain"] / "samples").exists()
    assert_same_tensors(trained_tensors(runs["sampled"]), trained_tensors(runs["plain"]), exact=True)
    # the exported LoRA: the same tensors bit for bit, and the same metadata (safetensors orders
    # the header's keys at random, so the files' bytes are compared through it)
    sampled, plain = (str(runs[name] / "lora.safetensors") for name in ("sampled", "plain"))
    assert_same_tensors(load_file(sampled), load_file(plain), exact=True)
    with safe_open(sampled, "pt") as a, safe_open(plain, "pt") as b:
        assert a.metadata() == b.metadata()


def test_generate_with_the_lora_equals_diffusers_and_the_final_sample(runs, model_dir, tmp_path) -> None:
    """The run's LoRA (lora_unet_, lora_te1_, lora_te2_ keys) merged by ``hcp generate`` gives
    diffusers' ``load_lora_weights`` image, the run's own final sample, and itself again from the PNG."""
    lora = runs["sampled"] / "lora.safetensors"
    assert {key.split("_")[1] for key in load_file(str(lora))} == {"unet", "te1", "te2"}
    call = ["-p", "a red circle", "--negative-prompt", "lowres", "--seed", 11, "--steps", 3, "--cfg", 6,
            "--size", "64x48", "--scheduler", "euler_a", "--clip-skip", 1]  # fmt: skip
    with_lora = hcp_generate(model_dir, tmp_path / "with", *call, "--lora", lora)
    base = hcp_generate(model_dir, tmp_path / "base", *call)
    assert max_diff(pixels(with_lora), pixels(base)) > 8, "the LoRA made no visible difference; the checks prove nothing"

    # every part's merge: hcp's conditioning equals diffusers' with the file loaded, and differs from the base's
    loaded = load_for_generation(str(model_dir), loras=read_png_params(with_lora).loras, clip_skip=1, device="cpu",
                                 log_fn=lambda _msg: None)  # fmt: skip
    plain = load_for_generation(str(model_dir), clip_skip=1, device="cpu", log_fn=lambda _msg: None)
    pipe = diffusers_pipe(model_dir, "euler_a")
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        ours, before = loaded.encoder(["a red circle"]), plain.encoder(["a red circle"])
        embeds, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    d1 = loaded.models.text_encoder.config.hidden_size
    for what, view in {"te1 hidden": lambda e, p: e[..., :d1], "te2 hidden": lambda e, p: e[..., d1:],
                       "te2 pooled": lambda e, p: p}.items():  # fmt: skip
        assert (view(ours.hidden, ours.pooled) - view(before.hidden, before.pooled)).abs().max() > 1e-2, what
        torch.testing.assert_close(view(ours.hidden, ours.pooled), view(embeds, pooled), rtol=1e-4, atol=1e-5, msg=what)
    theirs = diffusers_image(pipe, prompt="a red circle", seed=11, steps=3, cfg=6.0, size=(64, 48), clip_skip=1,
                             **diffusers_negative(pipe, "lowres", clip_skip=1))  # fmt: skip
    assert max_diff(pixels(with_lora), theirs) <= 2  # diffusers runs the LoRA unmerged: rounding may differ

    # the run's final sample used the same settings, with the LoRA unmerged on the training modules
    final = runs["sampled"] / "samples" / f"step-{MAX_STEPS}" / "00.png"
    assert max_diff(pixels(with_lora), pixels(final)) <= 2
    # and the image's metadata alone renders it again
    assert cli.main(["generate", "--from-image", str(with_lora), "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(again), pixels(with_lora))


def test_from_image_reproduces_an_sdxl_image_at_its_native_size(model_dir, tmp_path) -> None:
    first = hcp_generate(model_dir, tmp_path / "first", "-p", PROMPT, "--negative-prompt", NEGATIVE, "--seed", 21,
                         "--steps", 2, "--scheduler", "dpm++_2m", "--clip-skip", 2)  # fmt: skip
    params = read_png_params(first)
    assert (params.width, params.height, params.clip_skip, params.model) == (64, 64, 2, str(model_dir.resolve()))
    assert pixels(first).shape == (64, 64, 3)  # the tiny UNet's sample_size 8 times the VAE's 8
    assert cli.main(["generate", "--from-image", str(first), "--out", str(tmp_path / "copy")]) == 0
    assert cli.main(["generate", "--from-image", str(first), "--seed", "22", "--out", str(tmp_path / "copy")]) == 0
    same, other = sorted((tmp_path / "copy").glob("*.png"))
    assert np.array_equal(pixels(same), pixels(first))
    assert read_png_params(other).seed == 22 and max_diff(pixels(other), pixels(first)) > 0


def test_sdxl_generation_errors_name_the_option(model_dir, tmp_path, capsys) -> None:
    base = ["generate", "--model", str(model_dir), "-p", "x", "--steps", "1", "--out", str(tmp_path / "out")]
    # the tiny encoders have 4 layers; SDXL starts at the penultimate one
    assert cli.main([*base, "--clip-skip", "3"]) == 2
    err = capsys.readouterr().err
    assert "--clip-skip 3 is out of range: this SDXL model allows 0 to 2 (it already uses the penultimate layer)" \
        in err and "Traceback" not in err
    # an SD 1.x word does not fit an SDXL model: named, no traceback
    write_embedding(tmp_path / "embs" / "old-word.pt", "old-word", torch.zeros(2, 32))
    assert cli.main([*base, "--embeddings", str(tmp_path / "embs")]) == 2
    err = capsys.readouterr().err
    assert "--embeddings: custom word file" in err and "old-word.pt holds one vector set" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_custom_words_render_like_diffusers_textual_inversion_per_encoder(model_dir, tmp_path) -> None:
    from hcp_core.tools.create_embedding import create_embedding

    emb = tmp_path / "embs"
    _, vectors, _ = create_embedding(str(model_dir), "my-cat", 2, out=str(emb), fmt="safetensors", seed=3)
    prompt = "a photo of my-cat on a red circle"
    ours = pixels(hcp_generate(model_dir, tmp_path / "out", "-p", prompt, "--negative-prompt", NEGATIVE, "--seed", 4,
                               "--steps", 3, "--size", "64x48", "--scheduler", "euler_a", "--embeddings", emb))  # fmt: skip
    pipe = diffusers_pipe(model_dir)
    call = dict(seed=4, steps=3, cfg=7.0, size=(64, 48), negative_prompt=NEGATIVE)
    without = diffusers_image(pipe, prompt=prompt, **call)
    pipe.load_textual_inversion(vectors["text_encoder"], token="my-cat", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["text_encoder_2"], token="my-cat", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    theirs = diffusers_image(pipe, prompt=prompt, **call)
    assert max_diff(ours, theirs) <= 1
    assert max_diff(ours, without) > 8  # the word mattered
