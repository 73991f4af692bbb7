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
