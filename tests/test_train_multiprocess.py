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


FULL_DISK_AT_STEP_1 = """
import errno
from hcp_core.train import checkpoint

real_write = checkpoint._write_files


def full_disk(folder, step, *args, **kwargs):
    if step == 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(folder, step, *args, **kwargs)


checkpoint._write_files = full_disk
"""


def test_a_checkpoint_failing_on_the_main_process_stops_every_process_with_a_message(tmp_path, demo_model_dir,
                                                                                      demo_data_dir) -> None:
    """A full disk while the main process writes step 1's checkpoint: it exits with its message, and
    the other process learns of it and exits with one too, instead of waiting at its next collective
    (until torchrun's agent kills it, or forever under a launcher without one)."""
    import os

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK_AT_STEP_1)  # every process imports it at start
    exp = tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=3, batch_size=1,
                                                 save_every=1))
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    result = torchrun(cfg, env={"PYTHONPATH": path})
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "hcp: error: could not write checkpoint step-00000001" in out and "the disk is full" in out
    assert "hcp: error: step 1: the main process could not write its checkpoint (see its message); this process stops too" in out
    assert "hcp_core/" not in out  # no traceback through hcp (torchrun prints its own on a failed worker)
    assert not (exp / "checkpoints" / "step-00000001").exists()
