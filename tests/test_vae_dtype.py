"""``model.vae_dtype``: chosen for the model and the precision, the older ``vae_fp32`` still read,
fp16 refused on a CPU, and cached latents kept apart per VAE dtype."""
from __future__ import annotations

import pytest
import torch

from hcp_core import cli
from hcp_core.errors import ConfigError
from hcp_core.train.precision import choose_vae_dtype
from train_support import pipeline_toml, write_pipeline


@pytest.mark.parametrize("requested, vae_fp32, precision, safe, cuda, chosen", [
    ("auto", None, "bf16", True, True, "bf16"),  # SD 1.x/2.x, SD3, FLUX
    ("auto", None, "bf16", False, True, "fp32"),  # SDXL's VAE and unknown VAEs stay fp32
    ("auto", None, "fp16", True, True, "fp32"),  # fp16 can overflow: only bf16 is automatic
    ("auto", None, "bf16", True, False, "fp32"),  # CPUs keep fp32
    ("auto", None, "no", True, True, "fp32"),
    ("bf16", None, "no", False, False, "bf16"),  # asked for: honoured
    ("auto", True, "bf16", True, True, "fp32"),  # the older switch
    ("auto", False, "bf16", False, True, "bf16"),
    ("auto", False, "bf16", True, False, "fp32"),  # it only ever halved the VAE on CUDA
])
def test_the_vae_dtype_choice(requested, vae_fp32, precision, safe, cuda, chosen) -> None:
    value, why = choose_vae_dtype(requested, vae_fp32, precision, bf16_safe=safe, cuda=cuda)
    assert value == chosen
    assert ("deprecated" in why) == (vae_fp32 is not None)


def test_the_families_say_which_vaes_are_safe_in_bf16(demo_model_dir, sdxl_model_dir) -> None:
    from hcp_core.plugins import get_registry
    from hcp_core.models.family import load_with_family

    answers = {}
    for path in (demo_model_dir, sdxl_model_dir):
        family, models = load_with_family(str(path), registry=get_registry())
        answers[models.kind] = family.vae_safe_in_bf16(models)
    assert answers == {"sd": True, "sdxl": False}
    flux = get_registry().families["models"].get("flux").build(None)
    assert flux.vae_safe_in_bf16(None) is True


def test_fp16_vae_on_a_cpu_is_refused_by_check_and_run(tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    with pytest.raises(ConfigError, match='vae_dtype = "fp16" needs a CUDA GPU'):
        choose_vae_dtype("fp16", None, "no", bf16_safe=True, cuda=False)
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=1))
    assert cli.main(["check", str(cfg), 'model.vae_dtype="fp16"']) == 2
    assert 'model: ERROR: model.vae_dtype = "fp16" needs a CUDA GPU' in capsys.readouterr().out


def test_a_bf16_vae_encodes_in_bf16_into_its_own_cache_folder(tmp_path, demo_model_dir, demo_data_dir) -> None:
    import hcp_core
    from diffusers import AutoencoderKL

    from hcp_core.data.latent_cache import vae_fingerprint

    exp, cache = tmp_path / "exp", tmp_path / "cache"
    text = pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=1, bucket='{ type = "fixed", target_size = [64, 64] }')
    text = text.replace("[data.ds]\n", f'[data.ds]\ncache_latents = true\ncache_dir = "{cache}"\n')
    hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text), ['model.vae_dtype="bf16"']))
    assert "VAE weights: bf16 (as configured (bf16))" in (exp / "train.log").read_text()
    vae = AutoencoderKL.from_pretrained(demo_model_dir / "vae")
    folders = [p.name for p in cache.iterdir()]
    # Keyed on the weights' dtype: an fp32 run would look in another folder and encode again.
    assert folders == [vae_fingerprint(vae.to(torch.bfloat16))]
    assert vae_fingerprint(vae.to(torch.float32)) not in folders
