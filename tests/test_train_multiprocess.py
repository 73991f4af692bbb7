"""Two CPU processes (gloo) under torchrun: identical ranks, and the same result as one process."""
from __future__ import annotations

from safetensors.torch import load_file

from train_support import (FIXED_64, assert_same_tensors, hcp, one_process_then_two, pipeline_toml, torchrun,
                           write_pipeline)


def test_two_processes_agree_and_match_one_process_with_the_same_global_batch(tmp_path, demo_model_dir, demo_data_dir) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    cfg_one = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, one, max_steps=4, batch_size=2), "one.toml")
    cfg_two = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, two, max_steps=4, batch_size=1), "two.toml")
    single = hcp("run", str(cfg_one))
    assert single.returncode == 0, single.stderr
    double = torchrun(cfg_two)
    assert double.returncode == 0, double.stderr[-3000:]
    # The engine compares a hash of every rank's trained weights at the end.
    assert "all 2 processes hold identical trained weights" in double.stderr
    # Only the main process writes: one log, one set of files.
    assert (two / "train.log").read_text().count("done: 4 steps") == 1
    # Adam steps of size ~lr turn float reduction-order noise into ~1e-5 differences.
    assert_same_tensors(load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors")), exact=False, atol=1e-4)


FLUX_LORA = """
[[lora_transformer]]
lr = 1e-2
rank = 2
alpha = 2.0
"""


def test_a_flux_lora_trains_on_two_processes_like_on_one(tmp_path, flux_model_dir, demo_data_dir) -> None:
    """The flow-matching family under torchrun: packed latents, per-sample sigmas and text ids are
    drawn per sample, so two ranks with half the batch each equal one process with the whole batch."""
    one, two, double = one_process_then_two(tmp_path, flux_model_dir, demo_data_dir, FLUX_LORA, max_steps=2,
                                            bucket=FIXED_64)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "all 2 processes hold identical trained weights" in double.stderr
    assert_same_tensors(load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors")), exact=False, atol=1e-4)
