"""hcp's LoRA files loaded by diffusers' own loader give diffusers the model hcp trained."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_support import fixed_inputs, outputs, trained_bundle

# Runs in a fresh interpreter: only diffusers, the demo folder and the LoRA file, no hcp code.
LOAD_IN_DIFFUSERS = textwrap.dedent(
    """
    import sys, torch
    from diffusers import StableDiffusionPipeline
    model_dir, lora, inputs_file, out_file = sys.argv[1:5]
    inputs = torch.load(inputs_file)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(lora)
    with torch.no_grad():
        te = pipe.text_encoder(inputs["ids"])[0]
        pred = pipe.unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample
    torch.save({"te": te, "pred": pred}, out_file)
    """
)


def _assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_kohya_file_loads_in_a_fresh_diffusers_process(demo_model_dir, tmp_path):
    # Linear (attention), Conv2d (resnets, samplers, 1x1 projections), float-rank (ff) and svd_init
    # groups on the UNet plus a text encoder group.
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path), svd=True)
    inputs = fixed_inputs(bundle)
    ours = outputs(bundle.unet, bundle.text_encoder, inputs)
    base = trained_bundle.__globals__["load_models"](str(demo_model_dir))
    before = outputs(base.unet, base.text_encoder, inputs)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, before))  # the LoRA matters
    [lora] = adapter.export(bundle, str(tmp_path), None)

    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LOAD_IN_DIFFUSERS, str(demo_model_dir), lora, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    _assert_same(ours, (theirs["te"], theirs["pred"]))


def test_peft_layout_loads_in_diffusers_and_a_wrong_scale_is_caught(demo_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path), options={"format": "peft"})
    inputs = fixed_inputs(bundle)
    ours = outputs(bundle.unet, bundle.text_encoder, inputs)
    [lora] = adapter.export(bundle, str(tmp_path), 3)
    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model_dir))
    pipe.load_lora_weights(lora)
    _assert_same(ours, outputs(pipe.unet, pipe.text_encoder, inputs))

    # The comparison is sensitive to the stored scale: a kohya file with alpha doubled, or with no
    # alpha (loaders then take alpha = rank, scale 1), must not pass.
    adapter.options.format = "kohya"
    kohya = load_file(adapter.export(bundle, str(tmp_path), None)[0])
    bad = {
        "double_alpha": {k: v * 2 if k.endswith(".alpha") else v for k, v in kohya.items()},
        "no_alpha": {k: v for k, v in kohya.items() if not k.endswith(".alpha")},
    }
    for name, tensors in bad.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(AssertionError):
            _assert_same(ours, outputs(pipe.unet, pipe.text_encoder, inputs))
