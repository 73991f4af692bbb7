"""The LoRA branch against independent computations: matrix algebra, F.conv2d and peft."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hcp_plugins.adapters.lora.layer import LoraBranch, attach_branch, detach_branch, rank_for
from hcp_plugins.adapters.lora.svd import export_factors, svd_init
from hcp_plugins.adapters.lora.weights import LoraWeights


def _randomise(branch: LoraBranch, seed: int = 0) -> None:
    """Non-zero factors, as after some training (a fresh branch has up = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        branch.down.weight.copy_(torch.randn(branch.down.weight.shape, generator=g))
        branch.up.weight.copy_(torch.randn(branch.up.weight.shape, generator=g) * 0.5)


def _with_lora(host: nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> LoraBranch:
    branch = LoraBranch(host, rank, alpha, dropout)
    _randomise(branch, seed)
    attach_branch(host, branch)
    return branch


def test_linear_output_is_host_plus_alpha_over_rank_times_up_down():
    torch.manual_seed(0)
    host = nn.Linear(6, 5)
    w, b = host.weight.detach().clone(), host.bias.detach().clone()
    branch = _with_lora(host, rank=3, alpha=2.0)
    x = torch.randn(4, 6)
    down, up = branch.down.weight.detach(), branch.up.weight.detach()

    expected = x @ w.T + b + (2.0 / 3) * (x @ down.T @ up.T)
    got = host(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The test can tell a wrong scale apart: alpha alone (no / rank) or 1 / rank give other numbers.
    for wrong in (2.0, 1.0 / 3):
        assert not torch.allclose(got, x @ w.T + b + wrong * (x @ down.T @ up.T), atol=1e-3)


def test_alpha_equal_to_rank_adds_up_down_unscaled_and_dropout_still_applies():
    torch.manual_seed(0)
    host = nn.Linear(6, 5)
    w, b = host.weight.detach().clone(), host.bias.detach().clone()
    branch = _with_lora(host, rank=4, alpha=4.0)
    x = torch.randn(4, 6)
    down, up = branch.down.weight.detach(), branch.up.weight.detach()
    torch.testing.assert_close(host(x), x @ w.T + b + x @ down.T @ up.T, rtol=1e-5, atol=1e-5)

    dropped = _with_lora(nn.Linear(6, 5), rank=4, alpha=4.0, dropout=0.5)
    dropped.train()
    torch.manual_seed(3)
    mask_seed = torch.get_rng_state()
    out = dropped(x)
    torch.set_rng_state(mask_seed)
    kept = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, kept @ dropped.down.weight.detach().T @ dropped.up.weight.detach().T)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        dict(kernel_size=1),
        dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_update_equals_a_conv_with_the_merged_kernel(kwargs):
    torch.manual_seed(1)
    host = nn.Conv2d(3, 5, **kwargs)
    w, b = host.weight.detach().clone(), host.bias.detach().clone()
    branch = _with_lora(host, rank=2, alpha=3.0)
    x = torch.randn(2, 3, 9, 8)
    # Independent: one convolution whose kernel is W + (alpha/rank) * sum_r up[:, r] * down[r].
    merged = w + 1.5 * torch.einsum("or,rikl->oikl", branch.up.weight[:, :, 0, 0].detach(), branch.down.weight.detach())
    pad = host._reversed_padding_repeated_twice
    if host.padding_mode != "zeros":
        expected = F.conv2d(F.pad(x, pad, mode=host.padding_mode), merged, b, host.stride, 0, host.dilation)
    else:
        expected = F.conv2d(x, merged, b, host.stride, host.padding, host.dilation)
    torch.testing.assert_close(host(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(branch.delta_weight(), merged - w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_same_output_as_peft_given_the_same_weights(kind):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(2)
    host = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(4, 6, 3, stride=2, padding=1)
    theirs = nn.Sequential(copy.deepcopy(host))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=3.0, target_modules=["0"]), theirs)
    branch = _with_lora(host, rank=4, alpha=3.0, seed=5)
    peft_layer = theirs[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(branch.down.weight)
        peft_layer.lora_B["default"].weight.copy_(branch.up.weight)
    assert peft_layer.scaling["default"] == pytest.approx(branch.scale)
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(host(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_float_rank_is_a_fraction_of_output_channels():
    assert rank_for(4, 320) == 4
    assert rank_for(0.1, 320) == 32
    assert rank_for(0.1, 64) == 6  # round(6.4)
    assert rank_for(0.1, 66) == 7  # round(6.6)
    assert rank_for(0.01, 20) == 1  # never below 1
    assert rank_for(1.0, 5) == 5


def test_fresh_branch_changes_nothing_and_trains_only_its_factors():
    torch.manual_seed(3)
    host = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 3, 6, 6)
    before = host(x)
    branch = LoraBranch(host, rank=2, alpha=1.0)
    branch.reset(torch.Generator().manual_seed(0))
    attach_branch(host, branch)
    assert torch.equal(host(x), before)
    host(x).square().sum().backward()
    assert branch.up.weight.grad is not None and branch.up.weight.grad.abs().sum() > 0
    assert host.weight.grad is None


def test_dropout_acts_in_training_only():
    torch.manual_seed(4)
    host = nn.Linear(64, 8)
    w, b = host.weight.detach().clone(), host.bias.detach().clone()
    branch = _with_lora(host, rank=4, alpha=4.0, dropout=0.5)
    x = torch.randn(16, 64)
    exact = x @ w.T + b + x @ branch.delta_weight().T
    host.eval()
    torch.testing.assert_close(host(x), exact, rtol=1e-4, atol=1e-4)
    host.train()
    a, c = host(x), host(x)
    assert not torch.allclose(a, exact, atol=1e-3) and not torch.allclose(a, c, atol=1e-3)


def test_detach_restores_the_plain_layer():
    torch.manual_seed(5)
    host = nn.Linear(5, 5)
    x = torch.randn(2, 5)
    before = host(x)
    _with_lora(host, rank=2, alpha=1.0)
    assert not torch.allclose(host(x), before)
    copied = copy.deepcopy(host)
    detach_branch(host)
    assert torch.equal(host(x), before) and not hasattr(host, "hcp_lora")
    assert not torch.allclose(copied(x), before)  # the copy kept its own branch and hook


@pytest.mark.parametrize("host_factory", [lambda: nn.Linear(12, 10), lambda: nn.Conv2d(4, 6, 3, padding=1)])
def test_svd_init_keeps_step0_output_and_export_reproduces_training_on_the_original_weight(host_factory):
    torch.manual_seed(6)
    host = host_factory()
    original = copy.deepcopy(host)
    x = torch.randn(3, 12) if isinstance(host, nn.Linear) else torch.randn(2, 4, 5, 5)
    branch = LoraBranch(host, rank=3, alpha=2.0)
    svd_init(host, branch)
    attach_branch(host, branch)
    torch.testing.assert_close(host(x), original(x), rtol=1e-4, atol=1e-4)
    # The branch holds the top singular directions: the host lost exactly what the branch carries.
    assert not torch.allclose(host.weight, original.weight, atol=1e-3)
    s_host = torch.linalg.svdvals(host.weight.detach().reshape(host.weight.shape[0], -1))
    s_orig = torch.linalg.svdvals(original.weight.detach().reshape(host.weight.shape[0], -1))
    torch.testing.assert_close(s_host[: len(s_orig) - 3], s_orig[3:], rtol=1e-4, atol=1e-4)

    with torch.no_grad():  # "training"
        branch.up.weight.add_(0.3 * torch.randn_like(branch.up.weight))
        branch.down.weight.mul_(1.1)
    trained = host(x)
    down, up, alpha = export_factors(branch)
    assert down.shape[0] == 6 and alpha == pytest.approx(branch.scale * 6)  # rank 2r, same scale
    applied = copy.deepcopy(original)
    with torch.no_grad():
        applied.weight.add_(LoraWeights(down, up, alpha).delta())
    torch.testing.assert_close(applied(x), trained, rtol=1e-4, atol=1e-4)

    detach_branch(host)  # back to the original weight
    torch.testing.assert_close(host.weight, original.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "host, most",
    [
        (nn.Linear(12, 5), 5),
        (nn.Linear(3, 40), 3),
        (nn.Conv2d(2, 30, 3, padding=1), 18),  # the update is a 30 x (2 * 3 * 3) matrix
        (nn.Conv2d(16, 4, 1), 4),
    ],
)
def test_a_rank_beyond_the_layer_is_capped_and_the_output_unchanged(host, most):
    from hcp_plugins.adapters.lora.layer import max_rank

    assert max_rank(host) == most
    branch = LoraBranch(host, rank=100_000, alpha=8.0)
    assert (branch.requested_rank, branch.rank) == (100_000, most)
    assert branch.down.weight.shape[0] == most and branch.up.weight.shape[1] == most
    assert branch.scale == pytest.approx(8.0 / most)
    _randomise(branch)
    # Capped or not, the delta spans the same matrices: it still has full rank, no more.
    assert torch.linalg.matrix_rank(branch.delta_weight().reshape(branch.delta_weight().shape[0], -1)) == most


def test_capped_layers_are_summarised_in_one_warning(caplog):
    from hcp_plugins.adapters.lora.layer import warn_capped_ranks

    layers = {"a": LoraBranch(nn.Linear(4, 4), 8, 1.0), "b": LoraBranch(nn.Linear(64, 64), 8, 1.0),
              "c": LoraBranch(nn.Conv2d(1, 9, 1), 8, 1.0)}
    with caplog.at_level("WARNING"):
        assert warn_capped_ranks(layers) == 2
    records = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(records) == 1 and "2 of 3 LoRA layers" in records[0].getMessage()
    assert "a: rank 8 -> 4" in records[0].getMessage()
    caplog.clear()
    assert warn_capped_ranks({"b": layers["b"]}) == 0 and not caplog.records


def test_a_huge_rank_trains_and_exports_each_layer_at_its_own_size(tmp_path, demo_model_dir, demo_data_dir):
    import hcp_core
    from safetensors.torch import load_file

    from hcp_plugins.adapters.lora.config import MAX_RANK
    from train_support import pipeline_toml, write_pipeline

    # The largest rank the config accepts: far beyond every layer of the demo model.
    adapters = f"""
[[lora_unet]]
lr = 1e-3
rank = {MAX_RANK}
layers = ['re:.*\\.attn2$', 'down_blocks.0.resnets.0.conv1']
"""
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, adapters=adapters, max_steps=1))
    hcp_core.run(hcp_core.load_config(cfg))
    weights = load_file(str(exp / "lora.safetensors"))
    downs = {k[: -len(".lora_down.weight")]: v for k, v in weights.items() if k.endswith(".lora_down.weight")}
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in downs.values()), "the conv layer is missing"
    for layer, down in downs.items():
        up = weights[f"{layer}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == min(down[0].numel(), up.shape[0]), layer
    # The file holds the factors and little else: no 100000-row matrices.
    stored = sum(v.numel() * v.element_size() for v in weights.values())
    assert (exp / "lora.safetensors").stat().st_size < stored + 64 * 1024


def test_under_autocast_the_branch_keeps_the_activation_in_half_precision_and_fp32_masters() -> None:
    host = torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    branch = LoraBranch(host, 2, 2.0)
    torch.nn.init.normal_(branch.up.weight)
    attach_branch(host, branch)
    seen = []
    branch.down.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = host(x)
    assert seen == [(torch.bfloat16, torch.bfloat16)] and y.dtype == torch.bfloat16
    assert branch.down.weight.dtype == torch.float32  # master weights stay fp32
    # Without autocast the fp32 factors see an fp32 input: the exact path training on CPU takes.
    seen.clear()
    host.float()
    out = host(x.float())
    assert seen == [(torch.float32, torch.float32)]
    expected = torch.nn.functional.linear(x.float(), host.weight, host.bias) + branch.up(branch.down(x.float())) * branch.scale
    assert torch.equal(out, expected)
