"""Unit checks of the training maths against independent computations."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hcp_core.errors import ConfigError
from hcp_core.train.diffusion import draw_noise_and_timesteps
from hcp_plugins.models.stable_diffusion.ddpm import min_snr_weights, snr, training_target
from hcp_core.train.ema import Ema
from hcp_core.train.optim import build_optimizer, build_scheduler, optimizer_spec, scheduler_spec


def _scheduler(pred: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pred)


def test_noise_is_per_sample_so_batch_layout_does_not_matter() -> None:
    latents = torch.zeros(3, 4, 8, 8)
    noise, t = draw_noise_and_timesteps(latents, [5, 9, 11], seed=3, step=7, num_train_timesteps=1000)
    for i, sid in enumerate([5, 9, 11]):
        n1, t1 = draw_noise_and_timesteps(latents[:1], [sid], seed=3, step=7, num_train_timesteps=1000)
        assert torch.equal(n1[0], noise[i]) and t1[0] == t[i]
    other, _ = draw_noise_and_timesteps(latents, [5, 9, 11], seed=3, step=8, num_train_timesteps=1000)
    assert not torch.equal(other, noise)
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    big, _ = draw_noise_and_timesteps(torch.zeros(64, 4, 16, 16), list(range(64)), seed=0, step=0, num_train_timesteps=1000)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_noise_offset_adds_a_per_channel_constant() -> None:
    latents = torch.zeros(1, 4, 32, 32)
    plain, _ = draw_noise_and_timesteps(latents, [1], seed=0, step=0, num_train_timesteps=1000)
    offset, _ = draw_noise_and_timesteps(latents, [1], seed=0, step=0, num_train_timesteps=1000, noise_offset=0.5)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over each channel
    assert diff.abs().max() > 0


def test_targets_for_epsilon_and_v_prediction() -> None:
    sched = _scheduler("v_prediction")
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 700])
    assert torch.equal(training_target(sched, x0, eps, t, "epsilon"), eps)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(training_target(sched, x0, eps, t, "v_prediction"), a * eps - s * x0, atol=1e-6)


def test_min_snr_weights_match_the_formula() -> None:
    sched = _scheduler()
    t = torch.tensor([0, 100, 500, 999])
    ab = sched.alphas_cumprod[t].double()
    expected_snr = ab / (1 - ab)
    assert torch.allclose(snr(sched, t).double(), expected_snr, rtol=1e-5)
    gamma = 5.0
    w_eps = min_snr_weights(snr(sched, t), gamma, "epsilon")
    w_v = min_snr_weights(snr(sched, t), gamma, "v_prediction")
    for i, value in enumerate(expected_snr.tolist()):
        assert w_eps[i].item() == pytest.approx(min(value, gamma) / value, rel=1e-4)
        assert w_v[i].item() == pytest.approx(min(value, gamma) / (value + 1), rel=1e-4)
    assert min_snr_weights(snr(sched, t), None, "epsilon") is None


def test_masked_mse_weights_each_element() -> None:
    from hcp_plugins.losses.mse import MaskedMseLoss, MseLoss
    from hcp_core.interfaces import LossInputs

    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    weight = torch.rand(2, 1, 3, 3) * 5
    got = MaskedMseLoss()(pred, target, LossInputs(timesteps=None, weight_map=weight))
    want = [((pred[i] - target[i]) ** 2 * weight[i]).mean() for i in range(2)]
    assert torch.allclose(got, torch.stack(want))
    plain = MseLoss()(pred, target, LossInputs(timesteps=None))
    assert torch.allclose(plain, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="latent resolution"):
        MaskedMseLoss()(pred, target, LossInputs(timesteps=None, weight_map=torch.ones(2, 1, 6, 6)))


def test_schedulers_warm_up_then_follow_their_shape() -> None:
    p = torch.nn.Parameter(torch.zeros(1))

    def lrs(cfg, total: int = 10) -> list[float]:
        opt = build_optimizer([{"params": [p], "lr": 1.0}], optimizer_spec("sgd"))
        sched = build_scheduler(opt, cfg, total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(scheduler_spec("constant", warmup_steps=4))[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = lrs(scheduler_spec("cosine", warmup_steps=2))
    assert cos[:2] == [0.5, 1.0]
    for step in range(2, 10):
        progress = (step - 2) / 8
        assert cos[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    lin = lrs(scheduler_spec("linear"))
    assert lin == pytest.approx([1 - s / 10 for s in range(10)])
    cycle = lrs(scheduler_spec("one_cycle", warmup_steps=3))
    assert max(cycle) == pytest.approx(1.0) and cycle.index(max(cycle)) in (2, 3) and cycle[-1] < 0.01


def test_each_parameter_group_keeps_its_own_learning_rate() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], optimizer_spec("sgd", weight_decay=0.0))
    (a + b).sum().backward()
    opt.step()
    assert a.item() == pytest.approx(0.9) and b.item() == pytest.approx(0.99)


@pytest.mark.parametrize("section, name, message", [
    ("optimizer", "adamm", "invalid config:\n  train.optimizer: unknown optimizer 'adamm'. Did you mean 'adamw'?"),
    ("scheduler", "cosin", "invalid config:\n  train.scheduler: unknown lr scheduler 'cosin'. Did you mean 'cosine'?"),
])
def test_unknown_optimizer_or_scheduler_names(section, name, message) -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError) as err:
        if section == "optimizer":
            build_optimizer([{"params": [p], "lr": 1.0}], optimizer_spec(name))
        else:
            opt = build_optimizer([{"params": [p], "lr": 1.0}], optimizer_spec())
            build_scheduler(opt, scheduler_spec(name), 10)
    assert str(err.value).startswith(message)


def test_ema_follows_the_formula_and_swaps_in_for_export() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema([p], decay=0.9)
    expected = torch.zeros(3)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    assert torch.allclose(ema.shadow[0], expected)
    with ema.swapped_in():
        assert torch.allclose(p.detach(), expected)
    assert torch.equal(p.detach(), torch.full((3,), 3.0))
    restored = Ema([p], decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow[0], ema.shadow[0])


def test_adamw_is_fused_where_it_can_be_and_steps_like_plain_adamw() -> None:
    from hcp_plugins.optimizers.factories import can_fuse

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    cfg = optimizer_spec(weight_decay=0.01)
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    opt = build_optimizer([{"params": fused[:1], "lr": 0.1}, {"params": fused[1:], "lr": 0.01}], cfg)
    assert opt.defaults["fused"] is True
    plain = [torch.nn.Parameter(t.clone()) for t in start]  # independent: torch's per-tensor loop
    ref = torch.optim.AdamW([{"params": plain[:1], "lr": 0.1}, {"params": plain[1:], "lr": 0.01}],
                            betas=cfg.config.betas, eps=cfg.config.eps, weight_decay=0.01, foreach=False)  # fmt: skip
    for step_grads in grads:
        for params, optimizer in ((fused, opt), (plain, ref)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not can_fuse([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}])
    assert not can_fuse([{"params": []}])
