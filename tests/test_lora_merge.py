"""``hcp tools merge-lora``: merged folders and single files that load with the same weights everywhere."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hcp_core.errors import UserError
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.generation.params import LoraSpec, parse_lora_spec
from hcp_core.tools.merge_lora import main, merge_lora

from lora_support import fixed_inputs, outputs, trained_bundle


@pytest.fixture(scope="module")
def merged(demo_model_dir, tmp_path_factory):
    """A trained LoRA, its hcp outputs, and the model merged at weight 0.5 (folder + single file)."""
    tmp = tmp_path_factory.mktemp("merge")
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp), svd=True)
    [lora] = adapter.export(bundle, str(tmp), None)
    main(["--model", str(demo_model_dir), "--lora", f"{lora}:0.5", "--out", str(tmp / "out"),
          "--single-file", str(tmp / "merged.safetensors")])  # fmt: skip
    deltas = {(l.target, l.name): l.branch for l in adapter.layers.values()}
    return {"dir": tmp / "out", "file": tmp / "merged.safetensors", "lora": lora, "bundle": bundle, "deltas": deltas}


def test_merged_folder_holds_base_plus_weighted_lora(merged, demo_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(merged["dir"]))
    base = load_models(str(demo_model_dir))
    from hcp_plugins.adapters.lora.svd import export_factors
    from hcp_plugins.adapters.lora.weights import LoraWeights

    for (target, name), branch in list(merged["deltas"].items())[::7]:
        delta = LoraWeights(*export_factors(branch)).delta()  # relative to the original weights
        got = getattr(pipe, target).get_submodule(name).weight - getattr(base, target).get_submodule(name).weight
        torch.testing.assert_close(got, 0.5 * delta, rtol=1e-4, atol=1e-5)
    # Untouched parts are copied as they were.
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)


def test_merged_at_weight_one_behaves_like_the_trained_model(merged, demo_model_dir, tmp_path):
    merge_lora(demo_model_dir, [(merged["lora"], 1.0)], tmp_path / "full")
    full = load_models(str(tmp_path / "full"))
    inputs = fixed_inputs(merged["bundle"])
    for a, b in zip(outputs(merged["bundle"].unet, merged["bundle"].text_encoder, inputs), outputs(full.unet, full.text_encoder, inputs)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_text_encoder_is_saved_with_standard_text_model_keys(merged):
    from transformers import CLIPTextModel

    te_dir = merged["dir"] / "text_encoder"
    with safe_open(str(te_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    # Exactly transformers 4's CLIPTextModel names: "text_model." + transformers 5's flat names.
    loaded = CLIPTextModel.from_pretrained(str(te_dir))
    assert keys == {"text_model." + k for k in loaded.state_dict()}
    stored = load_file(str(te_dir / "model.safetensors"))
    assert all(torch.equal(stored["text_model." + k], v) for k, v in loaded.state_dict().items())
    assert not list(te_dir.glob("*.bin")) and len(list(te_dir.glob("*.safetensors"))) == 1


def test_single_file_has_the_original_layout_and_round_trips_through_diffusers(merged, demo_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    state = load_file(str(merged["file"]))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state and "model.diffusion_model.out.2.bias" in state
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # ldm's 1x1 conv
    # Mark one VAE and one UNet tensor so the test sees they really come from this file.
    state["first_stage_model.decoder.conv_out.bias"] = state["first_stage_model.decoder.conv_out.bias"] + 1
    save_file(state, str(tmp_path / "marked.safetensors"))
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "marked.safetensors"), config=str(demo_model_dir),
                                                      local_files_only=True)  # fmt: skip
    folder = StableDiffusionPipeline.from_pretrained(str(merged["dir"]))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys(), part
        for k in a:
            expected = a[k] + 1 if (part, k) == ("vae", "decoder.conv_out.bias") else a[k]
            assert torch.equal(b[k], expected), (part, k)


def test_command_line_errors(merged, demo_model_dir, tmp_path):
    # merge-lora and generate share one FILE[:WEIGHT] parser
    assert parse_lora_spec("a/b.safetensors:0.7") == LoraSpec("a/b.safetensors", 0.7)
    assert parse_lora_spec("C:\\x\\b.safetensors") == LoraSpec("C:\\x\\b.safetensors", 1.0)
    with pytest.raises(UserError, match="must be a number"):
        parse_lora_spec("b.safetensors:strong")
    with pytest.raises(UserError, match="exists and is not empty"):
        merge_lora(demo_model_dir, [(merged["lora"], 1.0)], merged["dir"])
    with pytest.raises(UserError, match="not a diffusers model folder"):
        merge_lora(tmp_path, [(merged["lora"], 1.0)], tmp_path / "o")
    with pytest.raises(UserError, match="LoRA file not found"):
        merge_lora(demo_model_dir, [(str(tmp_path / "none.safetensors"), 1.0)], tmp_path / "o2")
