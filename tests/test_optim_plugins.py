"""Optimizers and lr schedulers as plugin families: diffusers' schedules against their formulas,
schedule-free AdamW's exported weights and exact resume, Prodigy, options and names validated,
missing packages named with their pip command, and a third-party optimizer through extra_plugins.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import tomllib
from typing import Any, Callable, List

import attrs
import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core.config import build_pipeline
from hcp_core.errors import ConfigError, UserError
from hcp_core.hookspecs import hookimpl
from hcp_core.plugins import build_registry, get_registry
from hcp_core.train import packages
from hcp_core.train.optim import build_optimizer, build_scheduler, evaluation_weights, optimizer_spec, scheduler_spec
from train_support import pipeline_toml, trained_tensors, write_pipeline

TOTAL = 12


def lrs_of(scheduler: str, options: dict, group_lrs=(1.0,), total: int = TOTAL) -> List[List[float]]:
    """Each group's lr at steps 0 .. total-1 of the named schedule (SGD, a gradient of zero)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    opt = build_optimizer([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)], optimizer_spec("sgd"))
    sched = build_scheduler(opt, scheduler_spec(scheduler, **options), total)
    out = []
    for _ in range(total):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_diffusers_schedules_follow_their_formulas() -> None:
    # cosine_with_restarts: warm-up from 0, then num_cycles cosines each restarting at the peak.
    warm, cycles = 2, 2
    got = [g[0] for g in lrs_of("cosine_with_restarts", {"warmup_steps": warm, "num_cycles": cycles})]
    for step, lr in enumerate(got):
        if step < warm:
            want = step / warm
        else:
            progress = (step - warm) / (TOTAL - warm)
            want = 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        assert lr == pytest.approx(want, abs=1e-12), step
    assert got[warm] == pytest.approx(1.0) and got[warm + (TOTAL - warm) // cycles] == pytest.approx(1.0)  # the restart
    # polynomial: every group decays from its own lr to the absolute lr_end.
    end, power = 0.01, 2.0
    got2 = lrs_of("polynomial", {"warmup_steps": warm, "lr_end": end, "power": power}, group_lrs=(1.0, 0.1))
    for step, row in enumerate(got2):
        for lr, peak in zip(row, (1.0, 0.1)):
            want = peak * step / warm if step < warm else (peak - end) * (1 - (step - warm) / (TOTAL - warm)) ** power + end
            assert lr == pytest.approx(want, abs=1e-12), (step, peak)
    # constant_with_warmup: from 0 up to the lr over warmup_steps, then flat.
    assert [g[0] for g in lrs_of("constant_with_warmup", {"warmup_steps": 4})][:6] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])
    # piecewise_constant: factors[i] until steps[i], then the last factor.
    got3 = [g[0] for g in lrs_of("piecewise_constant", {"steps": [3, 7], "factors": [1.0, 0.5, 0.1]}, group_lrs=(0.2,))]
    assert got3 == pytest.approx([0.2] * 3 + [0.1] * 4 + [0.02] * 5)


def problems(*overrides: str, registry=None) -> str:
    from hcp_core.config.loader import apply_override

    raw = {"model": {"pretrained": "m"}, "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "i"}],
                                                          "bucket": {"type": "ratio"}}}}
    for item in overrides:
        apply_override(raw, item)
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, registry or get_registry())
    return str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.optimizer='adamww'", "train.optimizer: unknown optimizer 'adamww'. Did you mean 'adamw'?"),
    ("train.optimizer={ type = 'prodigyy', d_coef = 2 }", "train.optimizer: unknown optimizer 'prodigyy'. Did you mean 'prodigy'?"),
    ("train.scheduler='cosine_with_restart'",
     "train.scheduler: unknown lr scheduler 'cosine_with_restart'. Did you mean 'cosine_with_restarts'?"),
    ("train.optimizer.num_cycles=2", "train.optimizer.num_cycles: unknown key."),  # a table without type is adamw
    ("train.scheduler={ type = 'cosine_with_restarts', num_cycles = 0 }",
     "train.scheduler.num_cycles: must be between 1 and 10000, got 0"),
    ("train.scheduler={ type = 'piecewise_constant', steps = [5, 3], factors = [1, 1, 1] }",
     "train.scheduler.steps: must be strictly increasing step numbers, got [5, 3]"),
    ("train.scheduler={ type = 'piecewise_constant', steps = [5], factors = [1] }",
     "train.scheduler.factors: needs one factor per interval: 2 for 1 steps"),
    ("train.optimizer={ type = 'prodigy', d_coef = 0 }", "train.optimizer.d_coef: must be in (0, 1000], got 0.0"),
    ("train.optimizer={ type = 'sgd', nesterov = true }", "train.optimizer.nesterov: Nesterov momentum needs momentum > 0"),
    ("train.optimizer='adamw_schedulefree' train.scheduler='cosine'",
     "train.scheduler: the schedule-free optimizer 'adamw_schedulefree' needs a constant lr: set train.scheduler = "
     "\"constant\" without warmup_steps (use train.optimizer.warmup_steps), got 'cosine'"),
    ("train.trackers=['tensorbord']", "train.trackers[0]: unknown tracker 'tensorbord'. Did you mean 'tensorboard'?"),
])
def test_names_and_options_are_validated(override: str, message: str) -> None:
    assert message in problems(*_split(override))


def _split(overrides: str) -> List[str]:
    """``"a=1 train.b=2"`` -> ``["a=1", "train.b=2"]`` (several overrides in one parameter)."""
    parts = overrides.split(" train.")
    return [parts[0]] + [f"train.{p}" for p in parts[1:]]


def test_schedule_free_refuses_ema_and_warmup_but_takes_a_constant_schedule() -> None:
    assert "train.ema: the schedule-free optimizer 'adamw_schedulefree' already averages" in problems(
        "train.optimizer='adamw_schedulefree'", "train.ema.enabled=true")
    assert "train.scheduler: the schedule-free" in problems("train.optimizer='adamw_schedulefree'",
                                                            "train.scheduler={ warmup_steps = 3 }")
    # polynomial's lr_end must be below every group's lr: said when the run builds it.
    with pytest.raises(ConfigError, match="train.scheduler.lr_end = 0.5 is not below the lr 0.1 of parameter group 'g'"):
        opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1, "name": "g"}], optimizer_spec("sgd"))
        build_scheduler(opt, scheduler_spec("polynomial", lr_end=0.5), 10)


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("prodigyopt", "wandb") else real(name, *a))
    raw = tomllib.loads('model = { pretrained = "m" }\n[data.ds]\nbucket = { type = "ratio" }\n'
                        'sources = [{ type = "image_folder", img_root = "i" }]\n'
                        '[train]\noptimizer = "prodigy"\ntrackers = ["tensorboard", { type = "wandb", project = "p" }]\n')
    with pytest.raises(UserError) as err:
        packages.check_packages(build_pipeline(raw, get_registry()))
    assert str(err.value).split("\n") == [
        "train.optimizer: the optimizer 'prodigy' needs the Python package 'prodigyopt', which is not installed: "
        "pip install prodigyopt",
        "train.trackers[1]: the tracker 'wandb' needs the Python package 'wandb', which is not installed: pip install wandb",
    ]
    with pytest.raises(UserError, match="pip install prodigyopt"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], optimizer_spec("prodigy"))


def test_schedule_free_exports_its_average_and_trains_on_bit_identical_weights() -> None:
    pytest.importorskip("schedulefree", reason="pip install schedulefree")
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = build_optimizer([{"params": [p], "lr": 0.1}], optimizer_spec("adamw_schedulefree", betas=[0.8, 0.99]))
    for _ in range(3):
        p.grad = torch.randn(5, generator=gen)
        opt.step()
    y, z = p.detach().clone(), opt.state[p]["z"].clone()
    with evaluation_weights(opt):
        # x = y + (1 - 1/beta1) (z - y): the averaged iterate the schedule-free paper evaluates.
        torch.testing.assert_close(p.detach(), y + (1 - 1 / 0.8) * (z - y), rtol=1e-6, atol=1e-7)
    assert torch.equal(p.detach(), y) and opt.param_groups[0]["train_mode"]
    with evaluation_weights(torch.optim.SGD([p], lr=0.1)):  # other optimizers: untouched
        assert torch.equal(p.detach(), y)


SCHEDULE_FREE = 'optimizer = { type = "adamw_schedulefree", betas = [0.8, 0.99], warmup_steps = 1 }'


def test_schedule_free_resumes_bit_identical(tmp_path, demo_model_dir, demo_data_dir) -> None:
    """3 steps in one go (a checkpoint and exports at 2) == a copy resumed from its step-2 checkpoint."""
    pytest.importorskip("schedulefree", reason="pip install schedulefree")
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "whole", max_steps=3, save_every=2, batch_size=1,
                         scheduler='"constant"').replace('optimizer = { type = "adamw" }', SCHEDULE_FREE)
    cfg = write_pipeline(tmp_path, text)
    hcp_core.run(hcp_core.load_config(cfg))
    shutil.copytree(tmp_path / "whole", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "checkpoints" / "step-00000003")
    copy = hcp_core.load_config(cfg, [f'exp_dir="{tmp_path / "copy"}"'])
    hcp_core.run(copy, resume=str(tmp_path / "copy" / "checkpoints" / "step-00000002"))
    whole, resumed = trained_tensors(tmp_path / "whole"), trained_tensors(tmp_path / "copy")
    assert sorted(whole) == sorted(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)
    exported = [load_file(str(tmp_path / n / "lora.safetensors")) for n in ("whole", "copy")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    # The checkpoint holds the weights it trains on (y), the export its average (x): they differ.
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    y, x = whole[f"lora/unet.{module}.lora_up.weight"], exported[0][f"lora_unet_{module.replace('.', '_')}.lora_up.weight"]
    assert x.dtype == y.dtype and x.shape == y.shape and not torch.equal(x, y)


def test_prodigy_trains_and_checkpoints_its_step_size(tmp_path, demo_model_dir, demo_data_dir) -> None:
    pytest.importorskip("prodigyopt", reason="pip install prodigyopt")
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "p", max_steps=2, scheduler='"constant"',
                         adapters="[[lora_unet]]\nlr = 1.0\nrank = 2\nlayers = ['re:.*\\.attn2$']\n")
    text = text.replace('optimizer = { type = "adamw" }', 'optimizer = { type = "prodigy", d_coef = 2.0 }')
    run = hcp_core.load_config(write_pipeline(tmp_path, text))
    result = hcp_core.run(run)
    assert result.step == 2
    ups = [t for k, t in load_file(str(tmp_path / "p" / "lora.safetensors")).items() if k.endswith("lora_up.weight")]
    assert ups and all(t.abs().sum() > 0 for t in ups)
    # Its step-size estimate d (grown from d0 = 1e-6) is optimizer state, so the checkpoint keeps it.
    (ckpt,) = (tmp_path / "p" / "checkpoints").glob("step-*")
    groups = torch.load(ckpt / "training_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert all(g["d_coef"] == 2.0 and g["d"] > 1e-6 for g in groups)


# ----------------------------------------------------------------------------- a third-party optimizer
@attrs.define
class SignSgdConfig:
    """Sign SGD: every weight moves by lr * sign(gradient) times scale."""

    scale: float = 1.0


class SignSgd(torch.optim.Optimizer):
    steps: List[int] = []

    def __init__(self, config: SignSgdConfig, *, params: List[dict]) -> None:
        super().__init__(params, {"lr": 1e-3, "scale": config.scale})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        SignSgd.steps.append(len(self.param_groups))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"] * group["scale"])


class SignSgdPlugin:
    @staticmethod
    @hookimpl
    def hcp_register_optimizers(registry) -> None:
        registry.add("sign_sgd", config=SignSgdConfig, factory="test_optim_plugins:SignSgd")


def test_a_third_party_optimizer_trains(tmp_path, demo_model_dir, demo_data_dir) -> None:
    registry = build_registry(extra_plugins=[SignSgdPlugin])
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "s", max_steps=1, scheduler='"constant"')
    text = text.replace('optimizer = { type = "adamw" }', 'optimizer = { type = "sign_sgd", scale = 0.5 }\ntrackers = []')
    pipeline = hcp_core.load_config(write_pipeline(tmp_path, text), registry=registry)
    SignSgd.steps.clear()
    hcp_core.run(pipeline)
    assert SignSgd.steps == [1]
    # lora_up starts at zero: one sign step puts each of its weights at 0 or +-lr * scale.
    ups = [t for k, t in load_file(str(tmp_path / "s" / "lora.safetensors")).items() if k.endswith("lora_up.weight")]
    values = torch.cat([t.flatten().abs().unique() for t in ups]).unique()
    assert all(v == 0 or v == pytest.approx(5e-4) for v in values.tolist()) and values.max() == pytest.approx(5e-4)


def test_adamw8bit_steps_when_bitsandbytes_is_installed() -> None:
    pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.nn.Parameter(torch.ones(4096, device=device))  # bitsandbytes keeps 8-bit state from 4096 elements
    opt = build_optimizer([{"params": [p], "lr": 0.1}], optimizer_spec("adamw8bit", weight_decay=0.0))
    p.grad = torch.ones_like(p)
    opt.step()
    # Adam's first step moves every weight by lr * sign(gradient) (m/sqrt(v) = 1 after bias correction).
    torch.testing.assert_close(p.detach(), torch.full_like(p, 0.9), rtol=0, atol=1e-3)


def test_resume_rules_read_the_structured_configs() -> None:
    """Which optimizer/scheduler changes a resume applies or refuses, on resolved pipelines."""
    from hcp_core.config.pipeline import pipeline_to_dict
    from hcp_core.train.resume import classify

    def resolved(*overrides: str) -> dict:
        from hcp_core.config.loader import apply_override

        raw = {"model": {"pretrained": "m"}, "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "i"}],
                                                              "bucket": {"type": "ratio"}}}}
        for item in overrides:
            apply_override(raw, item)
        return pipeline_to_dict(build_pipeline(raw, get_registry()))

    old = resolved("train.optimizer={ type = 'prodigy' }", "train.scheduler={ type = 'cosine_with_restarts' }")
    applied, refused = classify(old, resolved("train.optimizer={ type = 'prodigy', d_coef = 2 }",
                                              "train.scheduler={ type = 'cosine_with_restarts', num_cycles = 3 }"), [])
    assert (applied, refused) == (["train.scheduler.num_cycles: 1 -> 3"], ["train.optimizer.d_coef: 1.0 -> 2.0"])
    applied, refused = classify(old, resolved("train.scheduler='polynomial'", "train.trackers=[]"), [])
    assert "train.optimizer.type: 'prodigy' -> 'adamw'" in refused and "train.scheduler.type: 'cosine_with_restarts' -> " \
           "'polynomial'" in refused and "train.trackers: (unset) -> []" in applied
    # A checkpoint from before per-optimizer options holds momentum/betas/eps for every optimizer.
    legacy = resolved()
    legacy["train"]["optimizer"].update(momentum=0.0)
    assert classify(legacy, resolved(), []) == ([], [])
