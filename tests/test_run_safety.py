"""Nothing lost: one run per folder, locks, stop signals, NaN weights, damaged checkpoints, resume
with a changed pipeline, and a full disk while saving."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core import cli
from hcp_core.train import checkpoint as ckpt
from hcp_core.train.run_folder import LOCK_NAME
from train_support import assert_same_tensors, hcp, hcp_env, pipeline_toml, start_run, trained_tensors, write_pipeline


def _pipe(tmp_path: Path, model: Path, data: Path, exp: Path, name: str = "pipe.toml", **kw) -> Path:
    return write_pipeline(tmp_path, pipeline_toml(model, data, exp, **kw), name)


def _steps(exp: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(exp)]


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(
        tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=3)
    assert cli.main(["run", str(cfg)]) == 0
    first = load_file(str(exp / "lora.safetensors"))
    capsys.readouterr()

    assert cli.main(["run", str(cfg), "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _steps(exp) == [3], "the refused run touched the old one"
    assert_same_tensors(load_file(str(exp / "lora.safetensors")), first)

    assert cli.main(["run", str(cfg), "train.max_steps=2", "--overwrite"]) == 0
    assert _steps(exp) == [2]
    [old] = list(tmp_path.glob("exp.old-*"))
    assert [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(old)] == [3]
    assert_same_tensors(load_file(str(old / "lora.safetensors")), first)
    assert "done: 3 steps" in (old / "train.log").read_text()
    log = (exp / "train.log").read_text()
    assert "done: 2 steps" in log and "done: 3 steps" not in log, "the logs of two runs were mixed"


def test_a_folder_locked_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(
        tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=1)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (exp / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": "earlier"}))
        assert cli.main(["run", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"process {live.pid}" in err and "is using exp_dir" in err
        assert not (exp / "config.toml").exists()
    finally:
        live.kill()
        live.wait()
    # The same lock, its process gone: taken over with a warning.
    assert cli.main(["run", str(cfg)]) == 0
    assert "stale lock" in (exp / "train.log").read_text()
    assert not (exp / LOCK_NAME).exists(), "the lock outlived its run"


def test_two_concurrent_runs_on_one_folder_one_is_refused(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=200)
    first = subprocess.Popen([sys.executable, "-m", "hcp_core", "run", str(cfg)], env=hcp_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (exp / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = hcp("run", str(cfg), "--overwrite")
        assert second.returncode == 2 and "is using exp_dir" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_leftovers_of_killed_saves_are_removed_and_an_exp_dir_that_is_a_file_is_refused(
        tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=2, save_every=1)
    assert cli.main(["run", str(cfg)]) == 0
    junk = [exp / "checkpoints" / ".step-00000002.tmp-99999", exp / "checkpoints" / ".step-00000001.old-99999"]
    for j in junk:
        j.mkdir()
        (j / "trainable.safetensors").write_bytes(b"half")
    assert cli.main(["run", str(cfg), "train.max_steps=3", "--resume"]) == 0
    assert not any(j.exists() for j in junk)

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    capsys.readouterr()
    assert cli.main(["run", str(cfg), f'exp_dir="{a_file}"']) == 2
    assert "is a file" in capsys.readouterr().err


def test_sighup_and_sigterm_become_a_stop_request_with_the_shell_exit_code() -> None:
    from hcp_core.train.interrupts import StopSignals, stopped

    before = signal.getsignal(signal.SIGHUP)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.agreed() == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) is before, "the handlers were not put back"
    err = stopped(signal.SIGHUP, 7, "runs/x/checkpoints/step-00000007")
    assert err.exit_code == 129 and "stopped by SIGHUP at step 7" in str(err)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path, demo_model_dir, demo_data_dir, sig) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=500)
    proc = start_run(cfg, exp)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"stopped by {name} at step" in err and "--resume" in err and "Traceback" not in err
    stopped_at = int(re.search(rf"stopped by {name} at step (\d+);", err).group(1))
    assert _steps(exp) == [stopped_at] and stopped_at >= 2
    assert (exp / f"lora-{stopped_at}.safetensors").is_file()
    assert not (exp / LOCK_NAME).exists()


def test_nan_weights_never_reach_a_checkpoint(tmp_path, demo_model_dir, demo_data_dir, monkeypatch, capsys) -> None:
    from hcp_core.train import loop

    original = loop.optimizer_step

    def poisoned(run, step):
        value = original(run, step)
        if step == 2:  # the third update produces a NaN weight while the loss was still finite
            with torch.no_grad():
                run.trained_params[0].view(-1)[0] = float("nan")
        return value

    monkeypatch.setattr(loop, "optimizer_step", poisoned)
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=6, save_every=1)
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "became NaN or infinite in the update of step 3" in err and "step-00000002" in err
    assert _steps(exp) == [1, 2]
    for path in list(exp.glob("lora*.safetensors")) + [p / ckpt.TRAINABLE for p in ckpt.list_checkpoints(exp)]:
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
    assert not (exp / "lora-3.safetensors").exists()


def test_resume_applies_new_learning_rates_and_max_steps_and_refuses_what_it_cannot_follow(
        tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=2)
    assert cli.main(["run", str(cfg)]) == 0
    capsys.readouterr()
    for override, shown in (("seed=8", "seed: 7 -> 8"), ('train.optimizer={ type = "sgd" }', "train.optimizer.type"),
                            ("lora_unet.0.rank=4", "lora_unet[0].rank: 2 -> 4")):
        assert cli.main(["run", str(cfg), override, "train.max_steps=4", "--resume"]) == 2, override
        err = capsys.readouterr().err
        assert shown in err and "cannot follow" in err and "Traceback" not in err, err
    assert _steps(exp) == [2]

    from hcp_core.train.runner import build_run, restore

    pipeline = hcp_core.load_config(cfg, ["train.max_steps=4", "lora_unet.0.lr=5e-4"])
    run = build_run(pipeline, resume=True)
    try:
        run, step = restore(run, "latest")
        # cosine over 4 steps with 1 warm-up step, at step 2, from the new peak lr
        expected = 5e-4 * 0.5 * (1 + math.cos(math.pi * (2 - 1) / (4 - 1)))
        assert step == 2
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    finally:
        run.close()
    assert "applied the changed value lora_unet[0].lr: 0.001 -> 0.0005" in (exp / "train.log").read_text()
    assert cli.main(["run", str(cfg), "train.max_steps=4", "lora_unet.0.lr=5e-4", "--resume"]) == 0
    assert _steps(exp)[-1] == 4


def test_a_damaged_latest_checkpoint_falls_back_and_a_named_one_is_reported(
        tmp_path, demo_model_dir, demo_data_dir, capsys) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=4, save_every=2, extra="")
    assert cli.main(["run", str(cfg), "train.keep_checkpoints=3"]) == 0
    good = {k: v.clone() for k, v in trained_tensors(exp).items()}  # step 4; cloned: the file is mapped
    latest = ckpt.list_checkpoints(exp)[-1]
    data = (latest / ckpt.TRAINABLE).read_bytes()
    (latest / ckpt.TRAINABLE).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert cli.main(["run", str(cfg), f"--resume={latest}", "train.keep_checkpoints=3"]) == 2
    err = capsys.readouterr().err
    assert str(latest / ckpt.TRAINABLE) in err and "damaged" in err and "Traceback" not in err
    assert cli.main(["run", str(cfg), "--resume", "train.keep_checkpoints=3"]) == 0
    assert "trying the checkpoint before it" in (exp / "train.log").read_text()
    # Resumed from step 2 and trained steps 3-4 again: the same weights as the first time.
    assert_same_tensors(trained_tensors(exp), good)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, demo_model_dir, demo_data_dir, monkeypatch,
                                                                capsys) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=4, save_every=2)
    real = torch.save

    def full_at_step_4(obj, path, *a, **k):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_at_step_4)
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "step-00000002" in err and "Traceback" not in err
    assert _steps(exp) == [2]
    assert not [p for p in (exp / "checkpoints").iterdir() if p.name.startswith(".")], "a temporary folder was left"
    assert ckpt.load_checkpoint(ckpt.list_checkpoints(exp)[-1])[2]["step"] == 2


def test_exports_cut_off_by_a_kill_are_written_again_on_resume(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=2, save_every=1)
    assert cli.main(["run", str(cfg), "train.max_steps=1"]) == 0
    [one] = ckpt.list_checkpoints(exp)
    assert ckpt.is_exported(one)
    expected = load_file(str(exp / "lora-1.safetensors"))
    # As if killed between the checkpoint's rename and the export.
    (one / ckpt.EXPORTED).unlink()
    (exp / "lora-1.safetensors").unlink()
    assert cli.main(["run", str(cfg), "--resume"]) == 0
    assert_same_tensors(load_file(str(exp / "lora-1.safetensors")), expected)


def test_fine_tuning_norm_layers_on_cpu_trains_with_and_without_the_latent_cache(tmp_path, demo_model_dir,
                                                                                  demo_data_dir) -> None:
    # GroupNorm's CPU backward crashed on channels-last latents (exit 139) when only norms trained.
    # One run, two datasets: latents encoded on the fly and latents read from the cache.
    exp = tmp_path / "exp"
    adapters = "[[unet]]\nlr = 1e-3\nlayers = ['re:down_blocks\\.0\\.resnets\\.0\\.norm[12]$']\n"
    cached = f"""
[data.cached]
batch_size = 2
cache_latents = true
bucket = {{ type = "fixed", target_size = [64, 64] }}
sources = [{{ type = "image_folder", img_root = "{demo_data_dir}" }}]
"""
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=2, adapters=adapters, extra=cached)
    done = hcp("run", str(cfg))
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((exp / "latent_cache").rglob("*.safetensors")), "the second dataset's latents were not cached"
    trained = trained_tensors(exp)
    assert trained and all(".norm" in k for k in trained)


def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path, demo_model_dir, demo_data_dir) -> None:
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, demo_data_dir, exp, max_steps=500, batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_run(cfg, exp, launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                                          "127.0.0.1", "--master_port", str(port)))
    rank1 = next(pid for pid in _children(proc.pid) if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    log = (exp / "train.log").read_text()
    assert "interrupted: saving a checkpoint" in log
    [saved] = _steps(exp)
    assert f"stopped by SIGTERM at step {saved}" in err
    assert (exp / f"lora-{saved}.safetensors").is_file()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def test_resume_after_the_data_changed_says_what_changed(tmp_path, demo_model_dir, demo_data_dir) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    exp = tmp_path / "exp"
    cfg = _pipe(tmp_path, demo_model_dir, data, exp, max_steps=2)
    assert cli.main(["run", str(cfg)]) == 0
    image = next(p for p in sorted(data.iterdir()) if p.suffix == ".png")
    image.unlink()
    assert cli.main(["run", str(cfg), "train.max_steps=3", "--resume"]) == 0
    log = (exp / "train.log").read_text()
    assert "data.ds: the data changed since the checkpoint (12 samples per epoch then, 11 now" in log
    assert "images, captions, masks or repeats differ" in log


def test_a_checkpoint_older_than_a_key_resumes_when_the_key_is_at_its_default() -> None:
    from hcp_core.train.resume import classify, field_default

    assert field_default("data.any.flip") == 0.0 and field_default("model.compile") is False
    old = {"model": {"pretrained": "m", "vae_fp32": True}, "data": {"ds": {"batch_size": 1}}}
    same = {"model": {"pretrained": "m", "compile": False, "fp8_base": False, "vae_dtype": "auto"},
            "data": {"ds": {"batch_size": 1, "flip": 0.0}}}
    applied, refused = classify(old, same, [])
    assert refused == [] and applied == ["model.vae_fp32: True -> (unset)"]
    changed = {"model": {"pretrained": "m", "fp8_base": True}, "data": {"ds": {"batch_size": 1, "flip": 0.5}}}
    _, refused = classify(old, changed, [])
    assert refused == ["data.ds.flip: (unset) -> 0.5", "model.fp8_base: (unset) -> True"]
    # A speed switch whose numbers differ only by TF32 rounding may change on resume.
    applied, refused = classify(same, {**same, "model": {**same["model"], "allow_tf32": True}}, [])
    assert refused == [] and applied == ["model.allow_tf32: (unset) -> True"]
