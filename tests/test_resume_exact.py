"""Kill a run with SIGKILL after a checkpoint, resume it: it ends bit-identical to the uninterrupted run.

Each configuration switches on several stochastic or stateful options at once (LoRA dropout on
the UNet and the text encoder, tag shuffle/dropout, random crops, attention masks, EMA, gradient
accumulation, two datasets, a DataLoader worker, two processes), so that a global-RNG draw or a
piece of state that a resume loses shows up as a differing tensor.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import psutil  # an accelerate dependency
import pytest
import torch
from safetensors.torch import load_file

import hcp_core

from train_support import hcp_env, pipeline_toml, trained_tensors, write_pipeline

MAX_STEPS, SAVE_EVERY = 6, 2

DROPOUT_LORA = """
[[lora_unet]]
lr = 1e-3
rank = 2
alpha = 2.0
dropout = 0.3
layers = ['re:.*\\.attn2$']

[[lora_text_encoder]]
lr = 1e-3
rank = 2
dropout = 0.5
layers = ['re:.*self_attn\\.q_proj$']
"""


def tag_dataset(data: Path) -> str:
    """A second dataset: random crops, masks, tags dropped and shuffled, a DataLoader worker (that
    stays across its epoch change at step 4)."""
    return f"""
[data.tags]
batch_size = 2
loss_weight = 0.5
num_workers = 1
bucket = {{ type = "fixed", target_size = [48, 48], crop = "random" }}

[[data.tags.sources]]
type = "image_folder"
img_root = "{data}"
att_mask = "{data / "att_mask"}"
prompt_template = "{{caption}}"
text_transforms = [{{ type = "tag_dropout", p = 0.5 }}, {{ type = "tag_shuffle" }}]
"""


CONFIGS: Dict[str, Dict] = {
    "dropout-tags-random-crop-masks-ema-accumulation-two-datasets-worker": dict(
        processes=1, batch_size=2, extra=tag_dataset,
        overrides=['data.ds.bucket={ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2, crop = "random" }',
                   "train.ema={ enabled = true, decay = 0.5 }", "train.gradient_accumulation=2"],
    ),
    "two-processes-dropout-masks-ema": dict(
        processes=2, batch_size=1, extra=lambda data: "",
        overrides=["train.ema={ enabled = true, decay = 0.5 }"],
    ),
}


def _free_ports(n: int) -> List[int]:
    """``n`` distinct free ports (held open together, so no two runs share a rendezvous)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _command(cfg: Path, processes: int, port: int, *args: str) -> List[str]:
    if processes == 1:
        return [sys.executable, "-m", "hcp_core", "run", str(cfg), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "-m", "hcp_core", "run", str(cfg), *args]


def _env() -> Dict[str, str]:
    env = hcp_env()
    env["MASTER_ADDR"] = "127.0.0.1"
    return env


def _train(cfg: Path, processes: int, port: int, overrides: List[str], resume: bool = False) -> None:
    """Train to the end: in this process when it is one (saves a start-up), else under torchrun."""
    if processes == 1:
        hcp_core.run(hcp_core.load_config(cfg, overrides), resume="latest" if resume else None)
        return
    cmd = _command(cfg, processes, port, *overrides, *(["--resume"] if resume else []))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class KillAfterFirstCheckpoint(threading.Thread):
    """Runs ``cmd`` and SIGKILLs it and every process it started once checkpoint SAVE_EVERY is complete.

    A thread, so the uninterrupted run can train meanwhile; :meth:`check` joins it and fails the
    test if the run ended on its own before the kill.
    """

    def __init__(self, cmd: List[str], exp: Path) -> None:
        super().__init__(daemon=True)
        self.exp = exp
        self.stderr = exp.parent / f"{exp.name}.stderr"  # a file: a full pipe would stall the run
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        self.problem = ""
        self.start()

    def run(self) -> None:
        first = self.exp / "checkpoints" / f"step-{SAVE_EVERY:08d}" / "state.json"
        deadline = time.time() + 240
        while not first.exists() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if self.proc.poll() is not None:
            self.problem = "the run ended before its first checkpoint: " + self.stderr.read_text()[-3000:]
        elif not first.exists():
            self.problem = "no checkpoint within 240 s"
        # torchrun's ranks too (each in a session of its own), all at once, as a machine crash would.
        family = [psutil.Process(self.proc.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            family += family[0].children(recursive=True)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        self.proc.wait()
        # Orphaned ranks may stay zombies (no init to reap them in a container): dead is enough.
        deadline = time.time() + 60
        while not all(_dead(m) for m in family) and time.time() < deadline:
            time.sleep(0.01)

    def check(self) -> None:
        self.join()
        assert not self.problem, self.problem
        assert not (self.exp / "lora.safetensors").exists(), "the run finished before it was killed; test inconclusive"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_run_killed_after_a_checkpoint_resumes_bit_identical(tmp_path, demo_model_dir, demo_data_dir, name) -> None:
    c = CONFIGS[name]
    exps, cfgs = {}, {}
    for kind in ("whole", "killed"):
        exps[kind] = tmp_path / kind
        text = pipeline_toml(demo_model_dir, demo_data_dir, exps[kind], adapters=DROPOUT_LORA, masks=True,
                             max_steps=MAX_STEPS, save_every=SAVE_EVERY, batch_size=c["batch_size"],
                             extra=c["extra"](demo_data_dir))
        cfgs[kind] = write_pipeline(tmp_path, text, f"{kind}.toml")
    ports = _free_ports(3)
    killer = KillAfterFirstCheckpoint(_command(cfgs["killed"], c["processes"], ports[0], *c["overrides"]), exps["killed"])
    _train(cfgs["whole"], c["processes"], ports[1], c["overrides"])
    killer.check()
    _train(cfgs["killed"], c["processes"], ports[2], c["overrides"], resume=True)

    whole, resumed = trained_tensors(exps["whole"]), trained_tensors(exps["killed"])
    assert sorted(whole) == sorted(resumed) and any(k.startswith("lora/text_encoder.") for k in whole)
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(whole)} trained tensors differ, e.g. {differ[:3]}"
    # The final export holds the EMA weights: the EMA state resumed exactly too.
    final_whole, final_resumed = (load_file(str(e / "lora.safetensors")) for e in (exps["whole"], exps["killed"]))
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)
    log = (exps["killed"] / "train.log").read_text()
    assert "resumed from" in log and f"done: {MAX_STEPS} steps" in log
