"""``hcp generate`` on the demo model: seeds, diffusers agreement, PNG metadata round trips, schedulers, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcp_core import cli
from hcp_core.generation.generate import load_for_generation
from hcp_core.generation.metadata import (
    format_parameters,
    params_from_parameters,
    parse_parameters,
    read_png_params,
    read_png_text,
    write_png,
)
from hcp_core.generation.params import GenerationParams, LoraSpec, parse_lora_spec, parse_size
from hcp_core.generation.render import render_image
from hcp_core.generation.schedulers import SCHEDULERS

FAST = ["--steps", "2", "--size", "64x64"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture
def generate(demo_model_dir, tmp_path):
    """``hcp generate`` through the real CLI (in this process), on the demo model, into ``tmp_path/out``."""

    def run(*args: str, out: Path | None = None, model: bool = True) -> int:
        base = ["generate", *(["--model", str(demo_model_dir)] if model else []), "--out", str(out or tmp_path / "out")]
        return cli.main([*base, *map(str, args)])

    return run


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    """The demo model loaded for generation (fp32, CPU); read-only."""
    return load_for_generation(str(demo_model_dir), device="cpu", log_fn=lambda _msg: None)


def test_same_seed_same_image_and_image_i_uses_seed_plus_i(generate, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square, white background\n")
    out = tmp_path / "out"
    assert generate("--prompt-file", prompts, "-n", 2, "--seed", 3, *FAST) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000-3.png", "00001-4.png", "00002-5.png", "00003-6.png"]
    # image 2 (second prompt, first repetition) has seed 3 + 2 and the second prompt
    assert read_png_params(out / "00002-5.png").prompt == "a blue square, white background"

    alone = tmp_path / "alone"
    assert generate("-p", "a blue square, white background", "--seed", 5, *FAST, out=alone) == 0
    assert np.array_equal(pixels(alone / "00000-5.png"), pixels(out / "00002-5.png"))

    assert generate("--prompt-file", prompts, "-n", 2, "--seed", 3, *FAST) == 0  # again, same folder: numbered on
    again = sorted(p.name for p in out.glob("*.png"))
    assert again[4:] == ["00004-3.png", "00005-4.png", "00006-5.png", "00007-6.png"]
    for first, second in zip(names, again[4:]):
        assert np.array_equal(pixels(out / first), pixels(out / second)), f"{second} differs from {first}"
    assert not np.array_equal(pixels(out / "00000-3.png"), pixels(out / "00001-4.png")), "seed had no effect"


def test_generation_equals_diffusers_own_prompt_encoding(demo, demo_model_dir) -> None:
    """Without clip skip and for short prompts, hcp's prompt_embeds equal the pipeline's own encoding."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    params = GenerationParams(prompt="a red circle on a blue background", negative_prompt="lowres, worst quality",
                              seed=42, steps=3, cfg=6.5, scheduler="ddim", width=64, height=48)  # fmt: skip
    ours = np.asarray(render_image(demo.models, demo.encoder, params))
    m = demo.models
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=DDIMScheduler.from_config(m.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=3, guidance_scale=6.5,
                  width=64, height=48, generator=torch.Generator().manual_seed(42)).images[0]  # fmt: skip
    assert ours.shape == (48, 64, 3)
    assert np.array_equal(ours, np.asarray(theirs))


def test_every_scheduler_renders(demo) -> None:
    images = {}
    for name in SCHEDULERS:
        params = GenerationParams(prompt="a green triangle", seed=1, steps=2, scheduler=name, width=64, height=64)
        image = np.asarray(render_image(demo.models, demo.encoder, params)).astype(np.int16)
        assert image.shape == (64, 64, 3) and image.std() > 0, name
        images[name] = image
    assert not np.array_equal(images["ddim"], images["euler_a"])


def test_parameters_text_round_trips() -> None:
    params = GenerationParams(
        prompt="masterpiece, 1girl: smiling\nsecond line, \"quoted\", 日本語", negative_prompt="lowres, bad: hands",
        seed=1234567890123, model="/models/C:odd, name/sd15.safetensors", steps=28, cfg=6.25, scheduler="dpm++_2m_karras",
        width=512, height=768, clip_skip=1, loras=(LoraSpec("/loras/a.safetensors", 0.8), LoraSpec("/loras/b:c.safetensors", -1.5)),
        embeddings=("/embs/one", "/embs/two"), prediction_type="v_prediction",
    )  # fmt: skip
    text = format_parameters(params, extra={"Training step": 40})
    last = text.splitlines()[-1]
    assert last.startswith("Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.25, Seed: 1234567890123, Size: 512x768, "
                           "Model: sd15, Model path: \"/models/C:odd, name/sd15.safetensors\", Clip skip: 2, ")
    assert params_from_parameters(text) == params
    parsed = parse_parameters(text)
    assert parsed["Training step"] == "40" and parsed["sampler"] == "DPM++ 2M Karras" and parsed["clip_skip"] == 1


def test_webui_text_parses() -> None:
    text = ("a cat on a sofa, <lora:cat:0.7>\nNegative prompt: worst quality\nSteps: 30, Sampler: Euler a, "
            "Schedule type: Automatic, CFG scale: 5.5, Seed: 42, Size: 512x640, Model hash: 6ce0161689, "
            "Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: \"cat: 1a2b3c\", Version: v1.10.1")  # fmt: skip
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a cat on a sofa, <lora:cat:0.7>" and parsed["negative_prompt"] == "worst quality"
    assert (parsed["steps"], parsed["scheduler"], parsed["cfg"], parsed["seed"]) == (30, "euler_a", 5.5, 42)
    assert (parsed["width"], parsed["height"], parsed["clip_skip"]) == (512, 640, 1)
    assert parsed["model_name"] == "v1-5-pruned-emaonly" and parsed["Lora hashes"] == "cat: 1a2b3c"
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_png_metadata_regenerates_the_same_image(generate, tmp_path, demo_model_dir) -> None:
    first = tmp_path / "first"
    args = ["-p", "a yellow star, dark background", "--negative-prompt", "blurry, lowres", "--seed", 77,
            "--steps", 3, "--cfg", 5.5, "--scheduler", "dpm++_2m", "--clip-skip", 1, "--size", "48x64"]  # fmt: skip
    assert generate(*args, out=first) == 0
    (image,) = first.glob("*.png")
    chunks = read_png_text(image)
    params = params_from_parameters(chunks["parameters"])
    assert params == read_png_params(image)  # the webui text and the hcp chunk say the same
    assert (params.seed, params.width, params.height, params.clip_skip, params.scheduler) == (77, 48, 64, 1, "dpm++_2m")
    assert params.model == str(Path(demo_model_dir).resolve())

    # from the parsed webui text alone, through the CLI's own options
    again = tmp_path / "again"
    assert generate("--model", params.model, "-p", params.prompt, "--negative-prompt", params.negative_prompt,
                    "--seed", params.seed, "--steps", params.steps, "--cfg", params.cfg, "--scheduler", params.scheduler,
                    "--clip-skip", params.clip_skip, "--size", f"{params.width}x{params.height}", out=again, model=False) == 0  # fmt: skip
    (copy,) = again.glob("*.png")
    assert np.array_equal(pixels(copy), pixels(image))
    assert read_png_text(copy)["parameters"] == chunks["parameters"]

    # --from-image: everything from the image, with one option overridden
    from_image = tmp_path / "from_image"
    assert generate("--from-image", image, out=from_image, model=False) == 0
    assert generate("--from-image", image, "--seed", 78, out=from_image, model=False) == 0
    same, other = sorted(from_image.glob("*.png"))
    assert np.array_equal(pixels(same), pixels(image))
    assert read_png_params(other).seed == 78 and not np.array_equal(pixels(other), pixels(image))


def test_size_and_lora_arguments() -> None:
    assert parse_size("512x768") == (512, 768) and parse_size("64") == (64, 64) and parse_size([64, 128]) == (64, 128)
    for bad in ("512x", "60x64", "0x64", "big", [64], True):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_lora_spec("a.safetensors:0.5") == LoraSpec("a.safetensors", 0.5)
    assert parse_lora_spec("C:\\loras\\a.safetensors") == LoraSpec("C:\\loras\\a.safetensors", 1.0)
    assert parse_lora_spec("C:\\loras\\a.safetensors:-1") == LoraSpec("C:\\loras\\a.safetensors", -1.0)


@pytest.mark.parametrize("args, message", [
    (["-p", "x", "--size", "64x60"], "--size: size 64x60: width and height must be positive multiples of 8"),
    (["-p", "x", "--size", "large"], "--size: 'large' is not a size: write WIDTHxHEIGHT"),
    (["-p", "x", "--scheduler", "euler-a"], "--scheduler: unknown scheduler 'euler-a'. Did you mean 'euler_a'?"),
    (["-p", "x", "--lora", "missing.safetensors:0.5"], "--lora: LoRA file missing.safetensors not found"),
    (["-p", "x", "--embeddings", "no-such-dir"], "--embeddings: folder no-such-dir not found"),
    (["-p", "x", "-n", "0"], "-n must be at least 1, got 0"),
    (["--seed", "1"], "no prompt: give --prompt TEXT, --prompt-file FILE or --from-image IMAGE"),
    (["-p", "x", "--clip-skip", "9", *FAST], "--clip-skip 9 is out of range: this model allows 0 to 3"),
])  # fmt: skip
def test_user_errors_name_the_option(generate, capsys, args, message) -> None:
    assert generate(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_images_from_webui_and_images_without_parameters(generate, tmp_path, capsys) -> None:
    assert generate("-p", "x", model=False) == 2
    assert "no model: give --model" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert generate("--from-image", plain, model=False) == 2
    assert "holds no generation parameters" in capsys.readouterr().err

    webui = tmp_path / "webui.png"
    write_png(Image.new("RGB", (8, 8)), webui, "a cat\nSteps: 2, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 9, "
                                               "Size: 64x48, Model hash: abc, Model: sd15")  # fmt: skip
    assert generate("--from-image", webui) == 2
    assert "Sampler 'DPM++ SDE Karras' has no diffusers equivalent in hcp" in capsys.readouterr().err
    assert generate("--from-image", webui, "--scheduler", "euler_a", model=False) == 2  # webui names no model path
    assert "no model: give --model" in capsys.readouterr().err
    assert generate("--from-image", webui, "--scheduler", "euler_a") == 0
    (made,) = (tmp_path / "out").glob("*.png")
    params = read_png_params(made)
    assert (made.name, params.prompt, params.scheduler, params.width, params.height) == ("00000-9.png", "a cat", "euler_a", 64, 48)
