"""FSDP from accelerate's configuration: settings, units, refusals, and two CPU (gloo) processes
that train a sharded fine-tune like one process with the doubled batch and resume exactly."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hcp_core.errors import UserError
from hcp_core.train.sharding import FsdpSettings, fsdp_settings, fsdp_units
from train_support import (FIXED_64, assert_same_tensors, free_port, hcp, one_process_then_two, pipeline_toml,
                           torchrun, write_pipeline)

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}

# A full fine-tune of two UNet blocks and the output conv, LoRA on cross-attention (inside and
# outside the fine-tuned blocks), EMA, previews, validation and every whole-model export: what
# runs outside a training step must gather the sharded weights. A text-encoder layer trains
# replicated beside them (bucketed all-reduce), and gradient clipping spans both kinds.
ADAPTERS = """
[[unet]]
lr = 1e-3
layers = ['down_blocks.0', 'up_blocks.1', 'conv_out']

[[text_encoder]]
lr = 1e-3
layers = ['encoder.layers.0']

[[lora_unet]]
lr = 1e-3
rank = 2
alpha = 2.0
layers = ['re:.*\\.attn2$']

[finetune]
export = ["trained", "diffusers", "single_file"]
"""
EXTRA = """
[train.ema]
enabled = true
decay = 0.9

[sample]
prompts = ["a red circle"]
every = 2
steps = 2
size = "32x32"

[validation]
every = 2

[validation.split.ds]
count = 3
"""


def test_settings_follow_accelerates_fsdp_variables() -> None:
    assert fsdp_settings({}) is None
    assert fsdp_settings({"ACCELERATE_USE_FSDP": "false"}) is None
    assert fsdp_settings(FSDP_ENV) == FsdpSettings(reshard_after_forward=True, wrap_classes=(), version="2")
    # FSDP1 configs name a sharding strategy (accelerate writes a name or its number).
    assert not fsdp_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}).reshard_after_forward
    assert fsdp_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}).reshard_after_forward
    got = fsdp_settings({**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
                         "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock, ResnetBlock2D"})
    assert got == FsdpSettings(reshard_after_forward=False, wrap_classes=("BasicTransformerBlock", "ResnetBlock2D"),
                               unused=("state_dict_type",))
    refused = {
        "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params: true, which hcp does not support"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("true", "model.gradient_checkpointing = true instead"),
        "FSDP_RESHARD_AFTER_FORWARD": ("NO_SHARD", "NO_SHARD, which is plain data parallel"),
        "FSDP_SHARDING_STRATEGY": ("HYBRID_SHARD", "sharding 'hybrid_shard' is not supported"),
    }
    for key, (value, message) in refused.items():
        env = {"ACCELERATE_USE_FSDP": "true", key: value}
        with pytest.raises(UserError, match=message):
            fsdp_settings(env)


def test_units_are_the_outermost_blocks_that_train(demo_model_dir) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo_model_dir / "unet")
    trained = {id(p) for name, p in unet.named_parameters() if name.startswith(("down_blocks.0.", "up_blocks.1.", "conv_out"))}
    assert fsdp_units(unet, trained) == [unet.down_blocks[0], unet.up_blocks[1]]  # conv_out: the root's
    by_class = fsdp_units(unet, trained, ["ResnetBlock2D"])
    assert by_class == [m for m in unet.down_blocks[0].resnets] + [m for m in unet.up_blocks[1].resnets]


def test_unsupported_fsdp_settings_are_refused_before_the_model_loads(tmp_path, demo_model_dir, demo_data_dir) -> None:
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS,
                                                 max_steps=1))
    env = {**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"}
    result = hcp("run", str(cfg), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fsdp_offload_params: true, which hcp does not support" in result.stderr
    assert not (tmp_path / "exp" / "config.toml").exists()


def test_options_fsdp_cannot_run_with_are_named(tmp_path, demo_model_dir, demo_data_dir) -> None:
    import attrs

    import hcp_core
    from hcp_core.train.sharding import check_compatible

    p = hcp_core.load_config(write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp",
                                                                    adapters=ADAPTERS)))
    check_compatible(p, "bf16")
    check_compatible(p, "no")
    sgd = hcp_core.load_config(write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp",
                                                                      adapters=ADAPTERS).replace('"adamw"', '"sgd"')))
    check_compatible(sgd, "no")
    prodigy = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS).replace('"adamw"', '"prodigy"')
    with pytest.raises(UserError, match='train.optimizer = "prodigy" does not work on FSDP.*use adamw or sgd'):
        check_compatible(hcp_core.load_config(write_pipeline(tmp_path, prodigy)), "no")
    with pytest.raises(UserError, match='FSDP with mixed_precision = "fp16" is not supported'):
        check_compatible(p, "fp16")
    with pytest.raises(UserError, match="model.fp8_base with FSDP is not supported"):
        check_compatible(attrs.evolve(p, model=attrs.evolve(p.model, fp8_base=True)), "bf16")
    check_compatible(attrs.evolve(p, model=attrs.evolve(p.model, compile=True)), "bf16")  # compiles between units


def test_two_fsdp_processes_train_like_one_with_the_doubled_batch_and_resume_exactly(tmp_path, demo_model_dir,
                                                                                     demo_data_dir) -> None:
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    texts = {exp: pipeline_toml(demo_model_dir, demo_data_dir, exp, adapters=ADAPTERS, extra=EXTRA, max_steps=4,
                                batch_size=size, save_every=2).replace("log_every = 1", "log_every = 1\nmax_grad_norm = 0.05")
             for exp, size in ((one, 2), (two, 1), (again, 1))}
    # The resumed run compiles the sharded UNet (dynamo's eager backend: graphs between the FSDP
    # units' gathers), which must not change a bit of what it trains.
    texts[again] = texts[again].replace("[model]\n", '[model]\ncompile = { backend = "eager" }\n', 1)
    single = hcp("run", str(write_pipeline(tmp_path, texts[one], "one.toml")))
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun(write_pipeline(tmp_path, texts[two], "two.toml"), env=FSDP_ENV)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    log = (two / "train.log").read_text()
    # 174 tensors: the fine-tuned blocks' and the LoRA factors; units: the blocks holding one (down
    # 0 and 1, up 1 and 2, the mid block's attention) and the root.
    assert ("FSDP (accelerate fsdp_version 2, applied as FSDP2): 174 trained tensors of the UNet2DConditionModel "
            "(0.5M values) sharded over 2 processes in 6 units") in log
    assert "all 2 processes hold identical trained weights" in log and "174 more are FSDP shards" in log

    # The same global batch: equal up to float reduction order (Adam turns ~1e-7 into ~1e-5).
    for name in ("finetune.safetensors", "lora.safetensors"):
        assert_same_tensors(load_file(str(one / name)), load_file(str(two / name)), exact=False, atol=1e-4)
    state_one = torch.load(one / "checkpoints/step-00000004/training_state.pt", weights_only=True)
    state_two = torch.load(two / "checkpoints/step-00000004/training_state.pt", weights_only=True)
    moments = state_two["optimizer"]["state"]
    assert len(moments) == 174 + 16 and all(type(v["exp_avg"]) is torch.Tensor for v in moments.values())  # whole tensors
    for i, entry in state_one["optimizer"]["state"].items():
        assert entry["exp_avg"].shape == moments[i]["exp_avg"].shape
        assert torch.allclose(entry["exp_avg"], moments[i]["exp_avg"], atol=1e-6)
    assert_same_tensors(state_one["ema"], state_two["ema"], exact=False, atol=1e-4)
    # Validation and previews ran the gathered model on both processes (3 held-out images: uneven shares).
    assert "validation at step 2: val_loss/ds" in log
    for step in (2, 4):
        a, b = (np.asarray(Image.open(exp / f"samples/step-{step}/00.png")).astype(int) for exp in (one, two))
        assert np.abs(a - b).max() <= 1
    # Whole-model exports name the model's own class and load in diffusers with the trained weights.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(two / "model" / "unet")
    trained = load_file(str(two / "finetune.safetensors"))  # both final exports hold the EMA weights
    weight = dict(unet.named_parameters())["down_blocks.0.resnets.0.conv1.weight"]
    assert torch.allclose(weight.float(), trained["unet.down_blocks.0.resnets.0.conv1.weight"], atol=1e-3)
    assert "UNet2DConditionModel" in (two / "model" / "model_index.json").read_text()
    assert "FSDP" not in (two / "model" / "unet" / "config.json").read_text()

    # Resume from step 2 under FSDP (compiled): the same weights, moments and EMA as the run that went on.
    shutil.copytree(two, again, ignore=shutil.ignore_patterns("step-00000004", "samples"))
    for stale in ("finetune.safetensors", "lora.safetensors", "model", "model.safetensors"):
        path = again / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = torchrun(write_pipeline(tmp_path, texts[again], "again.toml"), 2, "--resume", "latest", env=FSDP_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again_log = (again / "train.log").read_text()
    assert "resumed from" in again_log and "torch.compile: UNet2DConditionModel compiled with backend=eager" in again_log
    assert "torch.compile with FSDP: each FSDP unit's gather and reshard run eagerly" in again_log
    for name in ("finetune.safetensors", "lora.safetensors", "model.safetensors"):
        assert_same_tensors(load_file(str(two / name)), load_file(str(again / name)))
    state_again = torch.load(again / "checkpoints/step-00000004/training_state.pt", weights_only=True)
    assert_same_tensors(state_two["ema"], state_again["ema"])
    for i, entry in moments.items():
        assert torch.equal(entry["exp_avg_sq"], state_again["optimizer"]["state"][i]["exp_avg_sq"])


def test_fsdp_with_one_process_trains_unsharded(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    import hcp_core

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert hcp_core.run(hcp_core.load_config(cfg)).step == 1
    assert "FSDP is configured but only one process runs: nothing to shard" in (tmp_path / "exp" / "train.log").read_text()
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"  # hidden from accelerate only while it was built



FLUX_FINETUNE = """
[[transformer]]
lr = 1e-3
layers = ['transformer_blocks.0', 'single_transformer_blocks.0', 'proj_out']
"""


def test_a_sharded_flux_fine_tune_equals_one_process(tmp_path, flux_model_dir, demo_data_dir) -> None:
    """FLUX's transformer (joint and single blocks, views between them) under FSDP on two processes."""
    one, two, sharded = one_process_then_two(tmp_path, flux_model_dir, demo_data_dir, FLUX_FINETUNE, env=FSDP_ENV,
                                             max_steps=2, bucket=FIXED_64)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    log = (two / "train.log").read_text()
    assert "48 trained tensors of the FluxTransformer2DModel" in log and "in 3 units" in log
    assert "returned a view tensor" not in sharded.stderr
    trained = load_file(str(two / "finetune.safetensors"))
    assert any(k.startswith("transformer.single_transformer_blocks.0.") for k in trained)
    assert_same_tensors(load_file(str(one / "finetune.safetensors")), trained, exact=False, atol=1e-4)


def test_sharding_in_one_process_replaces_only_trained_parameters(monkeypatch) -> None:
    """The mechanics on a single-rank gloo group, in-process: which tensors become shards, that the
    replaced ones are emptied (an adapter holding them is refused), gathering and writing back."""
    from collections import OrderedDict

    import torch.distributed as dist
    from torch import nn

    from hcp_core.train.setup import refuse_stale_adapters
    from hcp_core.train.sharding import Sharding, shard_state

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(OrderedDict(blocks=nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), head=nn.Linear(4, 2)))
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [model.blocks[0].weight, model.head.bias]
        for p in trained:
            p.requires_grad_(True)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        frozen = model.blocks[1].weight

        class Holder:  # keeps Parameter objects from attach: what FSDP breaks
            def trainable_state(self):
                return {"w": trained[0].detach()}

        sharding, new = Sharding.shard(model, trained, FsdpSettings(), torch.device("cpu"), 1)
        assert set(new) == {id(p) for p in trained}
        assert sharding.units == [model.blocks[0], model]  # blocks[1] trains nothing: not a unit
        assert Sharding.is_sharded(model.blocks[0].weight) and Sharding.is_sharded(model.head.bias)
        assert model.blocks[1].weight is frozen and not Sharding.is_sharded(model.head.weight)
        assert trained[0].numel() == 0  # the whole copy is freed
        with pytest.raises(UserError, match="adapter 'holder' cannot train under FSDP.*'w' is now empty"):
            refuse_stale_adapters([("holder", Holder())])

        with sharding.gathered(write_back=True):
            assert type(model.blocks[0]) is nn.Linear  # its own class while gathered
            assert torch.equal(model.blocks[0].weight, before["blocks.0.weight"])
            with torch.no_grad():
                model.blocks[0].weight.mul_(2)  # what loading a checkpoint does
        assert type(model.blocks[0]).__name__ == "FSDPLinear"
        assert torch.equal(model.blocks[0].weight.full_tensor(), 2 * before["blocks.0.weight"])
        # A forward cut short inside (as a preview's caught out-of-memory): every unit is a shard again after.
        with sharding.gathered():
            with pytest.raises(NotImplementedError):
                model(torch.ones(1, 4))  # the root's forward starts, then its ModuleList cannot run
        assert Sharding.is_sharded(model.head.bias) and Sharding.is_sharded(model.blocks[0].weight)
        with sharding.in_cpu_memory(keep=True):
            assert not Sharding.is_sharded(model.head.bias) and torch.equal(model.head.bias, before["head.bias"])
        assert Sharding.is_sharded(model.head.bias)
        # A loaded whole optimizer moment becomes a shard like its parameter, and gathers back.
        moment = shard_state(torch.arange(2.0), model.head.bias)
        assert Sharding.is_sharded(moment) and moment.placements == model.head.bias.placements
        assert sharding.full({"m": moment})["m"].tolist() == [0.0, 1.0]
        assert not Sharding.is_sharded(shard_state(torch.ones(3), model.head.bias))  # another shape: left alone

        # Class names that match nothing leave one unit (the root): said, not silently accepted.
        import logging

        records: list = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("hcp").addHandler(handler)
        try:
            other = nn.Sequential(OrderedDict(blocks=nn.ModuleList([nn.Linear(4, 4)])))
            sharded, _ = Sharding.shard(other, list(other.parameters()), FsdpSettings(wrap_classes=("NoSuchBlock",)),
                                        torch.device("cpu"), 1)
        finally:
            logging.getLogger("hcp").removeHandler(handler)
        assert sharded.units == [other]
        assert any("no module of class NoSuchBlock in the Sequential holds a trained tensor" in r.getMessage()
                   for r in records)
    finally:
        dist.destroy_process_group()
