"""SDXL as one original-layout (SGM) file: written by hcp, read back by hcp and diffusers, trained, merged."""
from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcp_core.errors import UserError
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.tools.merge_lora import main as merge_lora_main
from hcp_core.tools.merge_lora import write_single_file
from train_support import assert_same_tensors, lora_on_folder_and_file

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def marked(sdxl_model_dir, tmp_path_factory):
    """The demo model with every tensor shifted by a per-part amount, and that model written as one file.

    The shift makes each weight differ from the folder's that diffusers would fall back on, and
    from the other parts', so a tensor read back equal can only have come from the file.
    """
    models = load_models(sdxl_model_dir)
    with torch.no_grad():
        for i, part in enumerate(PARTS):
            for tensor in getattr(models, part).state_dict().values():
                tensor.add_(0.125 * (i + 1))
    path = write_single_file(models, tmp_path_factory.mktemp("marked") / "model.safetensors", torch.float32)
    return models, path


def _assert_parts_equal(expected, got) -> None:
    for part in PARTS:
        a, b = getattr(expected, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys(), part
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)


def test_file_has_sdxl_original_layout(marked):
    models, path = marked
    state = load_file(str(path))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    unet = "model.diffusion_model."
    add = models.unet.add_embedding
    assert torch.equal(state[unet + "label_emb.0.0.weight"], add.linear_1.weight)
    assert torch.equal(state[unet + "label_emb.0.2.bias"], add.linear_2.bias)
    # level 1 (two transformer layers) starts at input block 1 + 1 * (layers_per_block + 1)
    assert unet + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in state
    assert unet + "middle_block.1.transformer_blocks.1.ff.net.2.weight" in state
    assert unet + "output_blocks.1.2.conv.weight" in state  # up level 0: resnet, attention, upsampler
    te1 = models.text_encoder
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"
    assert torch.equal(state[key], te1.get_submodule("encoder.layers.2.self_attn.q_proj").weight)

    # Encoder 2 in OpenCLIP's names, exactly these and no others.
    te2 = models.text_encoder_2
    layers = te2.config.num_hidden_layers
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
             "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]  # fmt: skip
    expected = {f"transformer.resblocks.{i}.{name}" for i in range(layers) for name in block}
    expected |= {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                 "text_projection", "logit_scale"}  # fmt: skip
    assert {k[len(TE2):] for k in state if k.startswith(TE2)} == expected
    attn = te2.text_model.encoder.layers[1].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(state[TE2 + "transformer.resblocks.1.attn.in_proj_weight"], fused)
    assert torch.equal(state[TE2 + "transformer.resblocks.1.attn.in_proj_bias"][-attn.v_proj.bias.numel():], attn.v_proj.bias)
    # OpenCLIP computes pooled @ text_projection: the transpose of the Linear weight
    pooled = torch.randn(3, te2.config.hidden_size)
    torch.testing.assert_close(pooled @ state[TE2 + "text_projection"], te2.text_projection(pooled))
    assert state[TE2 + "logit_scale"].item() == pytest.approx(math.log(100))


def test_file_loads_in_hcp_and_diffusers_with_every_weight(marked, sdxl_model_dir):
    from diffusers import StableDiffusionXLPipeline

    models, path = marked
    loaded = load_models(path, config=sdxl_model_dir)  # how a pipeline's model.pretrained + model.config load it
    assert loaded.kind == "sdxl" and loaded.tokenizer_2.pad_token == "!"
    _assert_parts_equal(models, loaded)
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_model_dir), local_files_only=True)
    _assert_parts_equal(models, pipe)


def test_a_file_missing_a_text_encoder_weight_is_refused_by_name(marked, sdxl_model_dir, tmp_path):
    # diffusers itself leaves such a weight empty (on the meta device) without a word
    state = load_file(str(marked[1]))
    del state[TE2 + "text_projection"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match=r"partial.safetensors' lacks 1 of the \d+ weights of the text_encoder_2 "
                                        r"\(text_projection.weight\)"):  # fmt: skip
        load_models(tmp_path / "partial.safetensors", config=sdxl_model_dir)


def test_training_on_the_file_matches_the_folder(sdxl_model_dir, demo_data_dir, tmp_path):
    single = write_single_file(load_models(sdxl_model_dir), tmp_path / "model.safetensors", torch.float32)
    runs = lora_on_folder_and_file(sdxl_model_dir, single, demo_data_dir, tmp_path)
    assert_same_tensors(runs["folder"], runs["file"], exact=False, atol=1e-6)


# kohya module name -> (model part, module path): a layer of each part, encoder 2's projection, and
# the added embedding that becomes label_emb in the single file.
LORA_LAYERS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    "lora_unet_add_embedding_linear_1": ("unet", "add_embedding.linear_1"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),
    "lora_te2_text_projection": ("text_encoder_2", "text_projection"),
}  # fmt: skip


def test_merge_lora_writes_an_sdxl_folder_and_single_file(sdxl_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = load_models(sdxl_model_dir)
    g = torch.Generator().manual_seed(0)
    tensors, deltas = {}, {}
    for name, (part, path) in LORA_LAYERS.items():
        out_features, in_features = getattr(base, part).get_submodule(path).weight.shape
        down, up = torch.randn(2, in_features, generator=g), torch.randn(out_features, 2, generator=g)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})
        deltas[(part, path)] = 0.5 * (1.0 / 2) * up @ down  # merge weight * alpha / rank * up @ down
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    out, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    assert merge_lora_main(["--model", str(sdxl_model_dir), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5",
                            "--out", str(out), "--single-file", str(single)]) == 0  # fmt: skip

    folder = StableDiffusionXLPipeline.from_pretrained(str(out))
    for part in PARTS:
        merged, original = getattr(folder, part).state_dict(), getattr(base, part).state_dict()
        for key, value in original.items():
            layer = (part, re.sub(r"\.(weight|bias)$", "", key))
            if key.endswith(".weight") and layer in deltas:
                torch.testing.assert_close(merged[key], value + deltas[layer], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(merged[key], value), (part, key)
    _assert_parts_equal(folder, load_models(single, config=sdxl_model_dir))
