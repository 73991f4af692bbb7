"""DoRA (``dora = true`` on a [[lora_*]] group): W' = m * (W + dW) / ||W + dW||, norm per output channel.

The formula is written out here; files are read back with safetensors, merged by hcp and loaded by
diffusers' own ``load_lora_weights`` (PEFT layout), and the layouts webui/ComfyUI read are checked.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hcp_core.errors import UserError
from hcp_core.interfaces import AdapterContext
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_plugins.adapters.lora.adapter import build_lora_adapter
from hcp_plugins.adapters.lora.config import LoraGroupConfig
from hcp_plugins.adapters.lora.dora import DoraBranch
from hcp_plugins.adapters.lora.layer import attach_branch
from hcp_plugins.adapters.lora.merge import apply_lora_file
from lora_support import fixed_inputs, outputs


def dora_weight(w: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, m: torch.Tensor) -> torch.Tensor:
    """m * V / ||V|| per output channel, V = W + scale * up @ down (this test's own computation)."""
    v = w + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape) * scale
    norms = torch.stack([v[i].pow(2).sum().sqrt() for i in range(v.shape[0])])
    return v * (m / norms).reshape(-1, *[1] * (v.dim() - 1))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_branch_output_is_the_decomposed_weight(kind: str) -> None:
    torch.manual_seed(0)
    host = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(4, 12) if kind == "linear" else torch.randn(2, 6, 7, 7)
    base = host(x)
    branch = DoraBranch(host, rank=3, alpha=6.0)
    branch.reset(torch.Generator().manual_seed(1))
    attach_branch(host, branch)
    torch.testing.assert_close(host(x), base)  # m starts as ||W||: nothing changes
    norms = host.weight.detach().reshape(host.weight.shape[0], -1).norm(dim=1)
    torch.testing.assert_close(branch.magnitude.detach(), norms)
    with torch.no_grad():
        branch.up.weight.normal_(0, 0.2)
        branch.magnitude.mul_(torch.linspace(0.5, 1.5, norms.numel()))
    w = dora_weight(host.weight.detach(), branch.down.weight.detach(), branch.up.weight.detach(), 2.0,
                    branch.magnitude.detach())  # fmt: skip
    expected = F.linear(x, w, host.bias) if kind == "linear" else F.conv2d(x, w, host.bias, padding=1)
    torch.testing.assert_close(host(x), expected, rtol=1e-4, atol=1e-5)
    out = host(x).sum()
    out.backward()
    assert branch.magnitude.grad is not None and branch.up.weight.grad is not None


GROUPS = {
    "unet": [LoraGroupConfig(layers=["re:.*attn2\\.to_(q|out\\.0)$", "re:.*resnets\\.0\\.conv1$"], rank=2, alpha=4.0,
                             dora=True)],
    "text_encoder": [LoraGroupConfig(layers=["re:.*self_attn\\.v_proj$"], rank=2, dora=True)],
}


@pytest.fixture(scope="module")
def dora(demo_model_dir, tmp_path_factory):
    """The demo model with DoRA groups moved off their start, and its kohya and PEFT files."""
    tmp = tmp_path_factory.mktemp("dora")
    bundle = load_models(str(demo_model_dir))
    adapter = build_lora_adapter(GROUPS, context=AdapterContext(exp_dir=str(tmp), seed=1, extra={"max_steps": 3}))
    adapter.attach(bundle)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.trainable_state().values():  # live tensors: move every factor and magnitude
            p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1))
    # [lora] format left out: the peft layout as lora.safetensors (diffusers), kohya's next to it
    peft, kohya = adapter.export(bundle, str(tmp), None)
    assert (peft, kohya) == (str(tmp / "lora.safetensors"), str(tmp / "lora.kohya.safetensors"))
    files = {"peft": peft, "kohya": kohya}
    return {"bundle": bundle, "adapter": adapter, "inputs": fixed_inputs(bundle), "base": load_models(str(demo_model_dir)),
            **files}  # fmt: skip


def test_kohya_file_has_dora_scale_per_output_channel(dora) -> None:
    with safe_open(dora["peft"], "pt") as f:
        assert f.metadata()["hcp_format"] == "peft"
    with safe_open(dora["kohya"], "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale")
        q = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.dora_scale")
    host = dora["bundle"].unet.down_blocks[0].resnets[0].conv1
    assert conv.shape == (host.out_channels, 1, 1, 1) and q.dim() == 2 and q.shape[1] == 1
    assert "lora_te_text_model_encoder_layers_0_self_attn_v_proj.dora_scale" in keys
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert '"dora_wd": "True"' in meta["ss_network_args"] and '"wd_on_output": "True"' in meta["ss_network_args"]
    layer = dora["adapter"].layers["unet.down_blocks.0.resnets.0.conv1"].branch
    torch.testing.assert_close(conv.flatten(), layer.magnitude.detach())


def test_merging_either_layout_gives_the_trained_model(dora, demo_model_dir) -> None:
    trained = outputs(dora["bundle"].unet, dora["bundle"].text_encoder, dora["inputs"])
    for fmt in ("kohya", "peft"):
        merged = copy.deepcopy(dora["base"])
        assert apply_lora_file(merged, dora[fmt], 1.0) == len(dora["adapter"].layers)
        for a, b in zip(trained, outputs(merged.unet, merged.text_encoder, dora["inputs"])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # weight w: W + w * (W' - W), as webui and ComfyUI apply a DoRA's strength
    base = copy.deepcopy(dora["base"])
    half = copy.deepcopy(base)
    apply_lora_file(half, dora["kohya"], 0.5)
    name = "down_blocks.0.resnets.0.conv1"
    b = dora["adapter"].layers[f"unet.{name}"].branch
    w0 = base.unet.get_submodule(name).weight.detach()
    full = dora_weight(w0, b.down.weight.detach(), b.up.weight.detach(), b.scale, b.magnitude.detach())
    torch.testing.assert_close(half.unet.get_submodule(name).weight, w0 + 0.5 * (full - w0), rtol=1e-5, atol=1e-6)


def test_diffusers_loads_the_peft_file_as_dora(dora, demo_model_dir) -> None:
    from diffusers import StableDiffusionPipeline

    with safe_open(dora["peft"], "pt") as f:
        mag = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector")
    assert mag.shape == (1, mag.numel(), 1, 1)
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(dora["peft"], adapter_name="dora")
    trained = outputs(dora["bundle"].unet, dora["bundle"].text_encoder, dora["inputs"])
    for a, b in zip(trained, outputs(pipe.unet, pipe.text_encoder, dora["inputs"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_input_axis_files_merge_as_comfyui_and_refuse_init_from(dora, demo_model_dir, tmp_path) -> None:
    """LyCORIS with wd_on_output = false stores dora_scale (1, in): norms per input column."""
    torch.manual_seed(3)
    host = dora["base"].unet.get_submodule("conv_in")  # (out, in, 3, 3)
    out_ch, in_ch = host.weight.shape[:2]
    down, up, m = torch.randn(2, in_ch, 3, 3) * 0.1, torch.randn(out_ch, 2, 1, 1) * 0.1, torch.rand(1, in_ch, 1, 1) + 1
    path = tmp_path / "input_axis.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
               "lora_unet_conv_in.alpha": torch.tensor(2.0), "lora_unet_conv_in.dora_scale": m}, str(path))  # fmt: skip
    merged = copy.deepcopy(dora["base"])
    apply_lora_file(merged, path, 1.0)
    v = host.weight.detach() + (up.flatten(1) @ down.flatten(1)).reshape(host.weight.shape)
    columns = torch.stack([v[:, j].pow(2).sum().sqrt() for j in range(in_ch)])
    torch.testing.assert_close(merged.unet.conv_in.weight, v * (m.flatten() / columns).reshape(1, -1, 1, 1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(UserError, match="normalises DoRA per input channel .* but not continue training it"):
        build_lora_adapter({"unet": [LoraGroupConfig(layers=["conv_in"], init_from=str(path))]},
                           context=AdapterContext(exp_dir=str(tmp_path))).attach(copy.deepcopy(dora["base"]))


def test_init_from_keeps_the_model(dora, demo_model_dir, tmp_path) -> None:
    """A DoRA file continues as DoRA; a plain LoRA file in a dora group starts with m = ||W + dW||."""
    trained = outputs(dora["bundle"].unet, dora["bundle"].text_encoder, dora["inputs"])
    fresh = copy.deepcopy(dora["base"])
    groups = {part: [LoraGroupConfig(layers=g.layers, init_from=dora["kohya"]) for g in gs] for part, gs in GROUPS.items()}
    cont = build_lora_adapter(groups, context=AdapterContext(exp_dir=str(tmp_path)))
    cont.attach(fresh)
    assert all(isinstance(layer.branch, DoraBranch) for layer in cont.layers.values())
    for a, b in zip(trained, outputs(fresh.unet, fresh.text_encoder, dora["inputs"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    plain = tmp_path / "plain.safetensors"
    with safe_open(dora["kohya"], "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.endswith(".dora_scale")}, str(plain))
    expected = copy.deepcopy(dora["base"])
    apply_lora_file(expected, plain, 1.0)
    fresh = copy.deepcopy(dora["base"])
    groups = {"unet": [LoraGroupConfig(layers=GROUPS["unet"][0].layers, init_from=str(plain), dora=True)]}
    build_lora_adapter(groups, context=AdapterContext(exp_dir=str(tmp_path))).attach(fresh)
    # (the UNet's: the group seeds the UNet layers only, the plain file changed the text encoder too)
    torch.testing.assert_close(outputs(expected.unet, fresh.text_encoder, dora["inputs"])[1],
                               outputs(fresh.unet, fresh.text_encoder, dora["inputs"])[1], rtol=1e-4, atol=1e-5)


def test_peft_layout_refuses_mixed_dora_groups(dora, tmp_path) -> None:
    groups = {"unet": [LoraGroupConfig(layers=["conv_in"], dora=True), LoraGroupConfig(layers=["conv_out"])]}
    ctx = AdapterContext(exp_dir=str(tmp_path), extra={"lora": {"format": "peft"}})
    with pytest.raises(UserError, match=r"lora_unet: some groups set dora = true and some do not; .* format = \"kohya\""):
        build_lora_adapter(groups, context=ctx).attach(dora["base"])  # refused before anything is attached
