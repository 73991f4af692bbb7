"""model.mixed_precision = "auto" picks the precision for the hardware; fp16 on a CPU is refused."""
from __future__ import annotations

import pytest

from hcp_core import cli
from hcp_core.errors import ConfigError
from hcp_core.train.precision import choose_precision
from train_support import pipeline_toml, write_pipeline


@pytest.mark.parametrize("cuda, bf16, chosen", [(False, False, "no"), (True, True, "bf16"), (True, False, "fp16")])
def test_auto_picks_by_hardware(cuda, bf16, chosen) -> None:
    value, why = choose_precision("auto", cuda=cuda, bf16_supported=bf16)
    assert value == chosen and why.startswith("auto:")


def test_explicit_choices_are_kept_or_refused_clearly() -> None:
    assert choose_precision("bf16", cuda=False, bf16_supported=False)[0] == "bf16"  # asked for: allowed on CPU
    assert choose_precision("no", cuda=True, bf16_supported=True)[0] == "no"
    with pytest.raises(ConfigError, match=r'"fp16" needs a CUDA GPU; on a CPU use "auto"'):
        choose_precision("fp16", cuda=False, bf16_supported=False)
    with pytest.raises(ConfigError, match="does not support bf16"):
        choose_precision("bf16", cuda=True, bf16_supported=False)


def test_the_default_is_auto_and_the_log_names_the_choice(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=1))
    assert cli.main(["run", str(cfg)]) == 0
    assert "mixed precision: auto: fp32 on CPU" in (exp / "train.log").read_text()
    capsys.readouterr()
    assert cli.main(["run", str(cfg), 'model.mixed_precision="fp16"', "--overwrite"]) == 2
    assert '"fp16" needs a CUDA GPU' in capsys.readouterr().err


def test_hcp_check_refuses_fp16_on_a_cpu(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert cli.main(["check", str(cfg), 'model.mixed_precision="fp16"']) == 2
    assert 'model: ERROR: model.mixed_precision = "fp16" needs a CUDA GPU' in capsys.readouterr().out


def test_bf16_on_a_cpu_keeps_frozen_weights_in_bf16_and_computes_the_same(demo_model_dir) -> None:
    """Asked for on a CPU, bf16 stores the frozen weights in bf16 as on a GPU (autocast would cast
    each of them in every forward anyway): trained weights stay fp32, the VAE stays fp32 ("auto" on a
    CPU), and the UNet's autocast output equals the fp32-stored UNet's under the same autocast."""
    import copy

    import torch

    from hcp_core.config.schema import ModelConfig
    from hcp_core.train.setup import place_models
    from hcp_plugins.models.stable_diffusion import StableDiffusionFamily

    models = StableDiffusionFamily().load(str(demo_model_dir))
    for module in models.modules().values():
        module.requires_grad_(False)
    unet = models.unet
    unet.conv_out.weight.requires_grad_(True)  # as a fine-tuned layer
    stored_fp32 = copy.deepcopy(unet)
    place_models(models, torch.device("cpu"), ModelConfig(pretrained="unused"), "bf16")
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in models.text_encoder.parameters()} == {torch.bfloat16}
    assert unet.conv_out.weight.dtype == torch.float32
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 6, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, encoder_hidden_states=text).sample
        expected = stored_fp32.train(unet.training)(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0)


def test_allow_tf32_turns_torchs_switches_on_and_the_log_says_so(tmp_path, demo_model_dir, demo_data_dir) -> None:
    """model.allow_tf32 = true sets torch's TF32 switches for fp32 matrix products and convolutions
    (process-wide); false leaves whatever they were; on a CPU the log says it has no effect."""
    import torch

    from hcp_core.train.precision import apply_tf32

    switches = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [s.allow_tf32 for s in switches]
    try:
        for switch in switches:
            switch.allow_tf32 = False
        assert apply_tf32(False, cuda=True) is None and not any(s.allow_tf32 for s in switches)
        assert apply_tf32(True, cuda=True) == "TF32: on for fp32 matrix products and convolutions (model.allow_tf32)"
        assert all(s.allow_tf32 for s in switches)
        exp = tmp_path / "exp"
        cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=1))
        assert cli.main(["run", str(cfg), "model.allow_tf32=true"]) == 0
        assert "model.allow_tf32: no effect on a CPU" in (exp / "train.log").read_text()
    finally:  # process-wide switches: leave them as the other tests found them
        for switch, value in zip(switches, before):
            switch.allow_tf32 = value
