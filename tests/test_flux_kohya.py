"""FLUX LoRA files in kohya's (BFL's) layout, ``[lora] format = "kohya"``: read back by diffusers'
own kohya FLUX converter (``FluxPipeline.load_lora_weights``) to the same transformer and CLIP
outputs as hcp's trained LoRA, and fused layers checked against the members' deltas."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcp_core.errors import UserError
from hcp_plugins.adapters.lora.adapter import build_lora_adapter
from hcp_plugins.adapters.lora.config import LoraGroupConfig
from test_lora_transformer import TE_GROUPS, assert_close, context, flux_bundle, flux_inputs, outputs, trained

#: Every kind of block layer diffusers' converter reads on the tiny model: the image attention (q,
#: k, v fused into img_attn_qkv), the text attention with k left out (a zero block in txt_attn_qkv)
#: at another rank and alpha, feed-forward and modulation, the single blocks' linear2 and modulation.
#: (diffusers drops the layers outside the blocks of a kohya file: they are checked by their deltas.)
GROUPS = [
    LoraGroupConfig(layers=[r"re:transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_add_out)$"], rank=4,
                    alpha=2.0),
    LoraGroupConfig(layers=[r"re:transformer_blocks\.\d+\.attn\.add_(q|v)_proj$"], rank=2, alpha=3.0),
    LoraGroupConfig(layers=[r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$",
                            r"re:transformer_blocks\.\d+\.norm1(_context)?\.linear$"], rank=3, alpha=1.0),
    LoraGroupConfig(layers=[r"re:single_transformer_blocks\.\d+\.(proj_out|norm\.linear)$"], rank=2, alpha=5.0),
]  # fmt: skip


def test_kohya_flux_file_loads_in_diffusers_with_hcps_outputs(flux_model_dir, tmp_path, caplog) -> None:
    from diffusers import FluxPipeline

    bundle = flux_bundle(flux_model_dir)
    adapter = trained(bundle, {"transformer": list(GROUPS), "text_encoder": list(TE_GROUPS)}, tmp_path, format="kohya")
    inputs = flux_inputs(bundle)
    ours = outputs(bundle, inputs)
    [path] = adapter.export(bundle, str(tmp_path), None)
    keys = set(load_file(path))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {n for n in names if n.startswith("lora_unet_")} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin",
        "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin",
    }  # fmt: skip
    assert all(n.startswith(("lora_unet_", "lora_te1_text_model_encoder_layers_")) for n in names)
    assert keys == {n + s for n in names for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}

    from diffusers.utils import logging as diffusers_logging

    pipe = FluxPipeline.from_pretrained(str(flux_model_dir))
    diffusers_logging.enable_propagation()  # diffusers' warnings reach caplog
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(path)
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if any(w in r.getMessage().lower() for w in ("unexpected", "missing",
                                                                                         "unsupported"))]
    lora_modules = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    trained_layers = {layer.name for layer in adapter.layers.values() if layer.target == "transformer"}
    assert lora_modules == trained_layers | {"transformer_blocks.0.attn.add_k_proj"}  # the zero block
    base = [o.clone() for o in outputs(flux_bundle(flux_model_dir), inputs)]
    theirs = outputs(pipe, inputs)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, base)), "the LoRA changed nothing; proves nothing"
    assert_close(ours, theirs, atol=1e-5)


def member_delta(layer) -> torch.Tensor:
    """A trained LoRA layer's delta, ``alpha / rank * up @ down``, from its branch."""
    b = layer.branch
    return (b.alpha / b.rank) * (b.up.weight.detach().float().flatten(1) @ b.down.weight.detach().float().flatten(1))


def file_delta(file, name: str) -> torch.Tensor:
    """``alpha / rank * up @ down`` of kohya layer ``name`` in a loaded file."""
    down, up = file[name + ".lora_down.weight"], file[name + ".lora_up.weight"]
    return float(file[name + ".alpha"]) / down.shape[0] * up @ down


def test_linear1_and_the_layers_outside_the_blocks_are_written_exactly(flux_model_dir, tmp_path, caplog) -> None:
    """diffusers' converter splits linear1 only at FLUX.1's real sizes (3072 / 12288) and drops the
    layers outside the blocks, so these are checked by their deltas: linear1 the members' deltas
    stacked (zeros for proj_mlp), the final adaLN's halves swapped into BFL's (shift, scale) order."""
    bundle = flux_bundle(flux_model_dir)
    groups = [LoraGroupConfig(layers=[r"re:single_transformer_blocks\.0\.attn\.to_(q|k)$"], rank=2, alpha=1.0),
              LoraGroupConfig(layers=[r"re:single_transformer_blocks\.0\.attn\.to_v$", "x_embedder", "norm_out.linear",
                                      "proj_out", "time_text_embed.guidance_embedder.linear_2"], rank=3, alpha=6.0)]
    adapter = trained(bundle, {"transformer": groups}, tmp_path, format="kohya")
    with caplog.at_level(logging.WARNING):
        [path] = adapter.export(bundle, str(tmp_path), None)
    assert "final_layer.adaLN_modulation.1, final_layer.linear, guidance_in.out_layer, img_in are outside" in caplog.text
    file = load_file(path)

    def delta(path: str) -> torch.Tensor:
        return member_delta(adapter.layers[f"transformer.{path}"])

    block = bundle.transformer.single_transformer_blocks[0]
    linear1 = torch.cat([delta(f"single_transformer_blocks.0.attn.to_{m}") for m in "qkv"]
                        + [torch.zeros_like(block.proj_mlp.weight)])  # BFL's linear1: q, k, v, mlp stacked
    assert file["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (2 + 2 + 3 + 3, block.attn.to_q.in_features)
    torch.testing.assert_close(file_delta(file, "lora_unet_single_blocks_0_linear1"), linear1, rtol=1e-5, atol=1e-6)
    scale, shift = delta("norm_out.linear").chunk(2)
    expected = {"lora_unet_final_layer_adaLN_modulation_1": torch.cat([shift, scale]),
                "lora_unet_final_layer_linear": delta("proj_out"), "lora_unet_img_in": delta("x_embedder"),
                "lora_unet_guidance_in_out_layer": delta("time_text_embed.guidance_embedder.linear_2")}
    for name, value in expected.items():
        torch.testing.assert_close(file_delta(file, name), value, rtol=1e-5, atol=1e-6)
    assert float(file["lora_unet_final_layer_linear.alpha"]) == 3.0  # diffusers ignores it: scale in up


def test_kohya_refusals_name_the_way_out(flux_model_dir, sd3_model_dir, tmp_path) -> None:
    from test_lora_transformer import sd3_bundle, sd3_sections

    flux = flux_bundle(flux_model_dir)
    dora = [LoraGroupConfig(layers=[r"re:.*attn\.to_q$"], rank=2, alpha=2.0, dora=True)]
    adapter = build_lora_adapter({"transformer": dora}, context=context(tmp_path, lora={"format": "kohya"}))
    with pytest.raises(UserError, match=r'format = "kohya".*flux.*not DoRA; write format = "peft"'):
        adapter.attach(flux)
    adapter = build_lora_adapter(sd3_sections(), context=context(tmp_path, lora={"format": "kohya"}))
    with pytest.raises(UserError, match=r'kohya.*SD, SDXL and FLUX only; for this sd3 model.*format = "peft"'):
        adapter.attach(sd3_bundle(sd3_model_dir))


def test_hcp_reads_a_kohya_flux_file_as_the_same_lora(flux_model_dir, tmp_path) -> None:
    """``hcp generate --lora`` / ``merge-lora`` read a kohya FLUX file: its fused layers split back
    exactly, so merging it gives the weights merging the same LoRA's diffusers (PEFT) file gives."""
    from hcp_plugins.adapters.lora.lora_file import LoraFileError, write_lora_file
    from hcp_plugins.adapters.lora.merge import apply_lora_file

    bundle = flux_bundle(flux_model_dir)
    groups = [*GROUPS, LoraGroupConfig(layers=[r"re:single_transformer_blocks\.0\.(attn\.to_(q|v)|proj_mlp)$",
                                               "norm_out.linear", "x_embedder"], rank=3, alpha=6.0)]
    adapter = trained(bundle, {"transformer": groups, "text_encoder": list(TE_GROUPS)}, tmp_path, format="kohya")
    layers = adapter.export_layers(bundle)
    files = {fmt: write_lora_file(tmp_path / f"{fmt}.safetensors", layers, fmt=fmt, kind="flux")
             for fmt in ("peft", "kohya")}
    merged = {}
    for fmt, path in files.items():
        target = flux_bundle(flux_model_dir)
        assert apply_lora_file(target, path) == len(layers)  # the zero blocks (to_k) add no layer
        merged[fmt] = {**target.transformer.state_dict(), **target.text_encoder.state_dict()}
    base = flux_bundle(flux_model_dir).transformer.state_dict()
    assert not torch.equal(merged["kohya"]["norm_out.linear.weight"], base["norm_out.linear.weight"])
    for key, value in merged["peft"].items():
        torch.testing.assert_close(merged["kohya"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    wrong = load_file(files["kohya"])  # a qkv layer of another width
    wrong["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.ones(5, 12)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoraFileError, match=r"'double_blocks\.0\.img_attn\.qkv' has 5 outputs but the model's layers have 96"):
        apply_lora_file(flux_bundle(flux_model_dir), tmp_path / "wrong.safetensors")


def test_a_run_continues_from_a_kohya_flux_file(flux_model_dir, tmp_path) -> None:
    """``init_from`` reads a kohya FLUX file: the fused layers split back to each member's own LoRA at
    its own rank (a block-diagonal qkv of three rank-4 LoRAs is three rank-4 LoRAs again), so the
    continued model starts exactly where the file left off."""
    bundle = flux_bundle(flux_model_dir)
    adapter = trained(bundle, {"transformer": list(GROUPS), "text_encoder": list(TE_GROUPS)}, tmp_path / "a",
                      format="kohya")
    inputs = flux_inputs(bundle)
    ours = outputs(bundle, inputs)
    [path] = adapter.export(bundle, str(tmp_path / "a"), None)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(path))

    seeded = {part: [LoraGroupConfig(layers=g.layers, rank=1, alpha=1.0, init_from=path) for g in groups]
              for part, groups in (("transformer", GROUPS), ("text_encoder", TE_GROUPS))}
    fresh = flux_bundle(flux_model_dir)
    cont = build_lora_adapter(seeded, context=context(tmp_path / "b"))
    cont.attach(fresh)
    assert_close(ours, outputs(fresh, inputs), atol=1e-5)
    assert cont.layers["transformer.transformer_blocks.0.attn.to_q"].branch.rank == 4  # the file's rank, not 3 x 4
