"""The lora adapter on the demo model: groups, state, export, continue-from-file, apply with a weight."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from hcp_core.errors import ConfigError, UserError
from hcp_core.interfaces import AdapterContext
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.plugins import get_registry
from hcp_plugins.adapters.lora.adapter import build_lora_adapter
from hcp_plugins.adapters.lora.config import LoraGroupConfig
from hcp_plugins.adapters.lora.merge import apply_lora_file

from lora_support import fixed_inputs, outputs, sections, trained_bundle


def test_registered_with_its_sections():
    comp = get_registry().adapters.get("lora")
    assert comp.sections == {"lora_unet": "unet", "lora_transformer": "transformer", "lora_text_encoder": "text_encoder",
                             "lora_text_encoder_2": "text_encoder_2", "lora_text_encoder_3": "text_encoder_3"}
    assert comp.config is LoraGroupConfig and comp.load() is build_lora_adapter


def test_groups_become_parameter_groups_and_change_nothing_at_step0(demo_model_dir, tmp_path):
    bundle = load_models(str(demo_model_dir))
    inputs = fixed_inputs(bundle)
    before = outputs(bundle.unet, bundle.text_encoder, inputs)
    adapter = build_lora_adapter(sections(), context=AdapterContext(exp_dir=str(tmp_path)))
    groups = adapter.attach(bundle)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("lora_unet[0]", 1e-4), ("lora_unet[1]", 2e-4), ("lora_unet[2]", 5e-5), ("lora_text_encoder[0]", 1e-5),
    ]  # fmt: skip
    assert all(p.requires_grad for g in groups for p in g["params"])
    layers = adapter.layers
    # Float rank: 0.25 of each layer's output channels (64 here), capped to what a 32 -> 256 layer can use.
    geglu = layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert geglu.host.out_features == 256 and geglu.branch.requested_rank == 64 and geglu.branch.rank == 32
    assert layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"].branch.rank == 32 // 4
    conv = layers["unet.down_blocks.0.resnets.0.conv1"]
    assert isinstance(conv.host, torch.nn.Conv2d) and conv.branch.down.kernel_size == (3, 3)
    assert layers["unet.down_blocks.0.downsamplers.0.conv"].branch.down.stride == (2, 2)
    assert "text_encoder.encoder.layers.0.mlp.fc1" in layers
    after = outputs(bundle.unet, bundle.text_encoder, inputs)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # One backward pass reaches the LoRA factors only (the base stays frozen).
    te, pred = bundle.text_encoder(inputs["ids"])[0], None
    pred = bundle.unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=te).sample
    pred.square().mean().backward()
    assert all(p.grad is not None for g in groups for p in g["params"][1::2])  # every up factor
    assert all(p.grad is None for p in bundle.unet.parameters() if not any(p is q for g in groups for q in g["params"]))


def test_bad_selections_are_errors_naming_the_group(demo_model_dir, tmp_path):
    bundle = load_models(str(demo_model_dir))
    ctx = AdapterContext(exp_dir=str(tmp_path))
    overlap = {"unet": [LoraGroupConfig(layers=["conv_in"]), LoraGroupConfig(layers=["re:conv_.*"])]}
    with pytest.raises(UserError, match=r"lora_unet\[1\]\.layers: layer 'conv_in' is already in lora_unet\[0\]"):
        build_lora_adapter(overlap, context=ctx).attach(bundle)
    assert not any(name.endswith("hcp_lora") for name, _ in bundle.unet.named_modules())  # nothing left behind
    typo = {"text_encoder": [LoraGroupConfig(layers=["encoder.layer"])]}
    with pytest.raises(UserError, match=r"lora_text_encoder\[0\]\.layers: layer name 'encoder.layer' .*'encoder.layers'"):
        build_lora_adapter(typo, context=ctx).attach(bundle)


def test_options_table_is_validated_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.format|lora: .*'kohya'"):
        build_lora_adapter({}, context=AdapterContext(exp_dir=str(tmp_path), extra={"lora": {"format": "ckpt"}}))
    with pytest.raises(ConfigError, match=r"formt.*Did you mean 'format'"):
        build_lora_adapter({}, context=AdapterContext(exp_dir=str(tmp_path), extra={"lora": {"formt": "peft"}}))


def test_trainable_state_restores_training_including_svd_start(demo_model_dir, tmp_path):
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path), svd=True)
    inputs = fixed_inputs(bundle)
    trained = outputs(bundle.unet, bundle.text_encoder, inputs)
    state = {k: v.clone() for k, v in adapter.trainable_state().items()}
    assert any(k.endswith(".svd_down0") for k in state)

    fresh, other = trained_bundle(demo_model_dir, str(tmp_path), svd=True, seed=99)
    # Pretend this process's SVD came out with flipped signs: resume must still be exact.
    for layer in other.layers.values():
        if layer.branch.svd_down0 is not None:
            layer.branch.svd_down0.neg_()
            layer.branch.svd_up0.neg_()
    other.load_trainable_state(state)
    for a, b in zip(trained, outputs(fresh.unet, fresh.text_encoder, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    plain, plain_adapter = trained_bundle(demo_model_dir, str(tmp_path))
    with pytest.raises(UserError, match="does not match this pipeline's LoRA groups .*unexpected: .*svd_down0"):
        plain_adapter.load_trainable_state(state)


def test_export_file_names_and_kohya_metadata(demo_model_dir, tmp_path):
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path), svd=True)
    [step_file] = adapter.export(bundle, str(tmp_path), 20)
    [final] = adapter.export(bundle, str(tmp_path), None)
    assert step_file == str(tmp_path / "lora-20.safetensors") and final == str(tmp_path / "lora.safetensors")
    with safe_open(final, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
        ff_down, ff_alpha = f.get_tensor(ff + ".lora_down.weight"), f.get_tensor(ff + ".alpha").item()
        te_alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item()
    # The commonest rank (56 attention layers) and alpha (42 conv + 24 text encoder layers).
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1"
    assert meta["ss_clip_skip"] == "2" and meta["hcp_clip_skip"] == "1"  # webui counts from 1
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "7" and meta["ss_max_train_steps"] == "7"
    assert meta["ss_sd_model_name"] == demo_model_dir.name and meta["ss_base_model_version"] == "sd_v1"
    assert "twice the configured rank" in meta["hcp_svd_init"]
    # svd_init, float rank 0.25 of 256 outputs = 64, capped at the weight's rank 32, and stored against
    # the original weights as 2 * 32 with alpha doubled: scale 1.5 / 32 = 3.0 / 64.
    assert ff_down.shape[0] == 64 and ff_alpha == pytest.approx(3.0)
    assert te_alpha == 1.0
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)


def test_init_from_continues_where_the_file_left_off(demo_model_dir, tmp_path):
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path / "a"), svd=True)
    inputs = fixed_inputs(bundle)
    trained = outputs(bundle.unet, bundle.text_encoder, inputs)
    [path] = adapter.export(bundle, str(tmp_path / "a"), None)

    fresh = load_models(str(demo_model_dir))
    seeded = sections()
    seeded["unet"] = [LoraGroupConfig(layers=g.layers, rank=g.rank, alpha=g.alpha, init_from="a/lora.safetensors")
                      for g in seeded["unet"]]  # fmt: skip
    seeded["unet"].append(LoraGroupConfig(layers=["re:time_embedding"], rank=2))  # not in the file: starts fresh
    seeded["text_encoder"] = [LoraGroupConfig(layers=["encoder"], init_from=path)]
    ctx = AdapterContext(exp_dir=str(tmp_path / "b"), base_dir=str(tmp_path))
    cont = build_lora_adapter(seeded, context=ctx)
    cont.attach(fresh)
    for a, b in zip(trained, outputs(fresh.unet, fresh.text_encoder, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The file's rank wins (svd layers came as 2r); the new layer uses its group's settings.
    assert cont.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"].branch.rank == 64
    assert cont.layers["unet.time_embedding.linear_1"].branch.rank == 2

    with pytest.raises(UserError, match=r"lora_unet\[0\]\.init_from: .* holds no LoRA weights for the unet"):
        te_only = tmp_path / "te.safetensors"
        from hcp_plugins.adapters.lora.lora_file import write_lora_file

        write_lora_file(te_only, [l for l in adapter.export_layers(bundle) if l.target == "text_encoder"])
        build_lora_adapter({"unet": [LoraGroupConfig(layers=["conv_in"], init_from=str(te_only))]},
                           context=ctx).attach(load_models(str(demo_model_dir)))  # fmt: skip


def test_apply_lora_file_with_a_weight(demo_model_dir, tmp_path):
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path))
    inputs = fixed_inputs(bundle)
    trained = outputs(bundle.unet, bundle.text_encoder, inputs)
    [path] = adapter.export(bundle, str(tmp_path), None)

    full = load_models(str(demo_model_dir))
    assert apply_lora_file(full, path, 1.0) == len(adapter.layers)
    for a, b in zip(trained, outputs(full.unet, full.text_encoder, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    base = load_models(str(demo_model_dir))
    half = copy.deepcopy(base)
    apply_lora_file(half, path, 0.5)
    name = "down_blocks.1.resnets.0.conv1"
    delta = adapter.layers[f"unet.{name}"].branch.delta_weight()
    got = half.unet.get_submodule(name).weight - base.unet.get_submodule(name).weight
    torch.testing.assert_close(got, 0.5 * delta, rtol=1e-4, atol=1e-6)


def test_detach_gives_back_the_base_model(demo_model_dir, tmp_path):
    bundle, adapter = trained_bundle(demo_model_dir, str(tmp_path), svd=True)
    inputs = fixed_inputs(bundle)
    adapter.detach()
    base = load_models(str(demo_model_dir))
    for a, b in zip(outputs(base.unet, base.text_encoder, inputs), outputs(bundle.unet, bundle.text_encoder, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert bundle.unet.state_dict().keys() == base.unet.state_dict().keys()


def test_a_layers_start_depends_on_the_seed_and_its_name_only(tmp_path):
    from hcp_core.interfaces import ModelBundle

    def start(layers, seed):
        torch.manual_seed(123)  # the global RNG must not matter
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1))
        bundle = ModelBundle(unet=net, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
        adapter = build_lora_adapter({"unet": [LoraGroupConfig(layers=layers)]},
                                     context=AdapterContext(exp_dir=str(tmp_path), seed=seed))  # fmt: skip
        adapter.attach(bundle)
        return adapter.layers["unet.1"].branch.down.weight.detach().clone()

    assert torch.equal(start(["1"], 0), start(["0", "1", "2"], 0))
    assert not torch.equal(start(["1"], 0), start(["1"], 1))


def test_svd_init_refuses_a_layer_that_is_also_fine_tuned(tmp_path):
    from hcp_core.interfaces import ModelBundle

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    net.requires_grad_(False)
    net[1].requires_grad_(True)  # as a [[unet]] fine-tune group would leave it
    bundle = ModelBundle(unet=net, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    adapter = build_lora_adapter({"unet": [LoraGroupConfig(layers=["0", "1"], svd_init=True)]},
                                 context=AdapterContext(exp_dir=str(tmp_path)))  # fmt: skip
    weight = net[0].weight.detach().clone()
    with pytest.raises(UserError, match=r"lora_unet\[0\]: svd_init on layer '1', whose weight is also trained"):
        adapter.attach(bundle)
    assert torch.equal(net[0].weight, weight)  # the layer done before the error was restored
