"""Flow-matching maths (plugins/models/flow_matching.py) against diffusers' own functions."""
from __future__ import annotations

import math

import pytest
import torch

from hcp_core.train.diffusion import draw_noise_and_timesteps, sample_seed
from plugins.models import flow_matching as fm

training_utils = pytest.importorskip("diffusers.training_utils")
pipeline_flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

FluxPipeline = pipeline_flux.FluxPipeline
IDS = list(range(40, 72))


def _diffusers_sigmas(scheme, ids, seed, step, **kw):
    """diffusers' density, batch size 1, from the generator sample_sigmas keys on each sample."""
    out = []
    for sid in ids:
        g = torch.Generator().manual_seed(sample_seed(seed, step, sid, stream=fm.SIGMA_STREAM))
        out.append(training_utils.compute_density_for_timestep_sampling(
            scheme, 1, logit_mean=kw.get("logit_mean", 0.0), logit_std=kw.get("logit_std", 1.0),
            mode_scale=kw.get("mode_scale", 1.29), generator=g))
    return torch.cat(out)


@pytest.mark.parametrize("scheme,kw", [
    ("uniform", {}),
    ("logit_normal", {}),
    ("logit_normal", {"logit_mean": -0.5, "logit_std": 1.5}),
    ("mode", {}),
    ("mode", {"mode_scale": 0.5}),
])
def test_sampling_matches_diffusers_density(scheme, kw):
    ours = fm.sample_sigmas(IDS, seed=7, step=3, scheme=scheme, **kw)
    ref = _diffusers_sigmas(scheme, IDS, 7, 3, **kw)
    assert ours.dtype == torch.float32 and ours.shape == (len(IDS),)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)  # equal up to the (0, 1) clamp


def test_static_shift_matches_scheduler_formula():
    base = fm.sample_sigmas(IDS, seed=1, step=0)
    shifted = fm.sample_sigmas(IDS, seed=1, step=0, shift=3.0)
    # FlowMatchEulerDiscreteScheduler(shift=3) shifts its training sigmas with this formula
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    torch.testing.assert_close(sched.sigmas[:-1], 3.0 * plain.sigmas[:-1] / (1 + 2.0 * plain.sigmas[:-1]))
    torch.testing.assert_close(shifted, 3.0 * base / (1 + 2.0 * base))


def test_per_sample_determinism_independent_of_batch():
    batch = fm.sample_sigmas([3, 11, 5, 42], seed=9, step=17, scheme="logit_normal")
    for i, sid in enumerate([3, 11, 5, 42]):
        alone = fm.sample_sigmas([sid], seed=9, step=17, scheme="logit_normal")
        assert alone.item() == batch[i].item()
    # a different process split of the same global batch draws the same sigmas
    split = torch.cat([fm.sample_sigmas([3, 11], seed=9, step=17), fm.sample_sigmas([5, 42], seed=9, step=17)])
    assert torch.equal(split, batch)
    assert not torch.equal(fm.sample_sigmas([3, 11, 5, 42], seed=9, step=18), batch)
    assert not torch.equal(fm.sample_sigmas([3, 11, 5, 42], seed=10, step=17), batch)


@pytest.mark.parametrize("scheme", fm.SAMPLING_SCHEMES)
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.3])
def test_sigmas_strictly_inside_unit_interval(scheme, shift):
    s = fm.sample_sigmas(range(500), seed=0, step=0, scheme=scheme, shift=shift)
    assert bool(((s > 0) & (s < 1)).all())


def test_extreme_draws_are_clamped_inside():
    # logit_std large enough that sigmoid rounds to exactly 0 or 1 in float32
    s = fm.sample_sigmas(range(200), seed=0, step=0, scheme="logit_normal", logit_std=200.0)
    assert bool(((s > 0) & (s < 1)).all())
    assert torch.isfinite(fm.loss_weights(s, "sigma_sqrt")).all()


def test_shift_moves_mean_the_right_way():
    ids = range(2000)
    plain = fm.sample_sigmas(ids, seed=2, step=5).mean()
    assert abs(plain.item() - 0.5) < 0.03  # logit-normal(0, 1) is symmetric about 1/2
    assert fm.sample_sigmas(ids, seed=2, step=5, shift=3.0).mean() > plain + 0.1  # towards noise
    assert fm.sample_sigmas(ids, seed=2, step=5, shift=0.5).mean() < plain - 0.05
    # FLUX: larger images get a larger mu, so noisier training sigmas
    base = fm.sample_sigmas(ids, seed=2, step=5, scheme="uniform")
    small = fm.dynamic_shift(base, fm.flux_shift(16 * 16))
    large = fm.dynamic_shift(base, fm.flux_shift(64 * 64))
    assert base.mean() < small.mean() < large.mean()


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 777])
def test_flux_shift_matches_calculate_shift(seq_len):
    assert fm.flux_shift(seq_len) == pytest.approx(pipeline_flux.calculate_shift(seq_len), abs=1e-12)
    kw = dict(base_seq_len=128, max_seq_len=8192, base_shift=0.3, max_shift=1.5)
    assert fm.flux_shift(seq_len, **kw) == pytest.approx(pipeline_flux.calculate_shift(seq_len, **kw), abs=1e-12)


def test_dynamic_shift_matches_scheduler_time_shift():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    t = torch.linspace(0.01, 0.99, 50)
    for mu in (0.5, 1.15, -0.2):
        torch.testing.assert_close(fm.dynamic_shift(t, mu), sched.time_shift(mu, 1.0, t))
    # one mu per sample
    mus = torch.tensor([0.5, 1.15])
    torch.testing.assert_close(fm.dynamic_shift(t[:2], mus), torch.stack([sched.time_shift(0.5, 1.0, t[0]),
                                                                          sched.time_shift(1.15, 1.0, t[1])]))


def test_dynamic_shift_equals_static_shift_of_exp_mu():
    mu = fm.flux_shift(4096)
    unshifted = fm.sample_sigmas(IDS, seed=4, step=2)
    static = fm.sample_sigmas(IDS, seed=4, step=2, shift=math.exp(mu))
    torch.testing.assert_close(fm.dynamic_shift(unshifted, mu), static)


def test_noise_is_per_sample_and_matches_ddpm_noise():
    latents = torch.zeros(3, 4, 6, 8, dtype=torch.float64)
    noise = fm.draw_noise(latents, [5, 1, 9], seed=3, step=4)
    assert noise.shape == latents.shape and noise.dtype == torch.float64
    alone = fm.draw_noise(latents[:1], [9], seed=3, step=4)
    assert torch.equal(alone[0], noise[2])
    ddpm, _ = draw_noise_and_timesteps(latents, [5, 1, 9], seed=3, step=4, num_train_timesteps=1000)
    assert torch.equal(noise, ddpm)
    g = torch.Generator().manual_seed(sample_seed(3, 4, 1))
    assert torch.equal(noise[1], torch.randn(4, 6, 8, generator=g).double())


def test_noisy_latents_and_target():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    torch.testing.assert_close(fm.noisy_latents(latents, noise, torch.zeros(2)), latents)
    torch.testing.assert_close(fm.noisy_latents(latents, noise, torch.ones(2)), noise)
    sig = torch.tensor([0.25, 0.8])
    x_t = fm.noisy_latents(latents, noise, sig)
    torch.testing.assert_close(x_t[0], 0.75 * latents[0] + 0.25 * noise[0])
    torch.testing.assert_close(x_t[1], 0.2 * latents[1] + 0.8 * noise[1])
    target = fm.velocity_target(latents, noise)
    torch.testing.assert_close(target, noise - latents)
    # the target is the derivative of x_t in sigma
    h = 1e-3
    torch.testing.assert_close((fm.noisy_latents(latents, noise, sig + h) - x_t) / h, target, atol=1e-3, rtol=1e-3)
    # packed latents [B, N, D] and low precision: sigmas follow the latents' dtype
    packed = fm.pack_latents(latents).bfloat16()
    out = fm.noisy_latents(packed, fm.pack_latents(noise).bfloat16(), sig)
    assert out.dtype == torch.bfloat16 and out.shape == packed.shape


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    sig = fm.sample_sigmas(IDS, seed=5, step=1, scheme="uniform")
    torch.testing.assert_close(fm.loss_weights(sig, scheme), training_utils.compute_loss_weighting_for_sd3(scheme, sig))


def test_loss_weights_none_and_errors():
    sig = torch.rand(4)
    assert fm.loss_weights(sig, "none") is None  # diffusers: all ones
    assert torch.equal(training_utils.compute_loss_weighting_for_sd3("none", sig), torch.ones(4))
    with pytest.raises(ValueError, match="loss weighting"):
        fm.loss_weights(sig, "logit_normal")
    with pytest.raises(ValueError, match="sampling scheme"):
        fm.sample_sigmas([0], seed=0, step=0, scheme="sigma_sqrt")
    with pytest.raises(ValueError, match="shift"):
        fm.sample_sigmas([0], seed=0, step=0, shift=0.0)


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 4, 2, 2), (3, 16, 64, 64)])
def test_pack_unpack_match_flux_pipeline(shape):
    b, c, h, w = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    packed = fm.pack_latents(x)
    assert packed.shape == (b, (h // 2) * (w // 2), c * 4)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, h, w))
    vae_scale_factor = 8  # FluxPipeline's; _unpack_latents takes the pixel size
    ref = FluxPipeline._unpack_latents(packed, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
    assert torch.equal(fm.unpack_latents(packed, h, w), ref)
    assert torch.equal(fm.unpack_latents(packed, h, w), x)


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 4, 5, 4))
    with pytest.raises(ValueError, match="do not match"):
        fm.unpack_latents(torch.zeros(1, 6, 16), 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_ids_match_flux_pipeline(dtype):
    h, w = 12, 20  # latent size
    ids = fm.latent_image_ids(h, w, "cpu", dtype)
    ref = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", dtype)
    assert ids.shape == (h // 2 * w // 2, 3) and ids.dtype == dtype
    assert torch.equal(ids, ref)
    # the ids line up with the packed token order
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    tokens = fm.pack_latents(x)[0]  # token k holds the 2x2 patch at (row, col) = ids[k, 1:]
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    torch.testing.assert_close(tokens[:, 0], (2 * rows * w + 2 * cols).float())
    t = fm.text_ids(7, "cpu", dtype)
    assert t.shape == (7, 3) and t.dtype == dtype and not t.any()
