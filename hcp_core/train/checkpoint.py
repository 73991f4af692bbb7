"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<exp_dir>/checkpoints/step-<N>/``. It is written under a temporary
name and renamed only when every file is flushed to disk, so a kill never leaves a
half-written checkpoint that looks complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

_NAME = re.compile(r"^step-(\d+)$")
TRAINABLE = "trainable.safetensors"
TRAINING_STATE = "training_state.pt"
META = "state.json"


def checkpoints_dir(exp_dir: str | os.PathLike) -> Path:
    return Path(exp_dir) / "checkpoints"


def list_checkpoints(exp_dir: str | os.PathLike) -> List[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(exp_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(exp_dir: str | os.PathLike, resume: str) -> Path:
    """``latest`` -> newest complete checkpoint in ``exp_dir``; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(exp_dir)
        if not found:
            raise UserError(f"--resume: no checkpoint in {checkpoints_dir(exp_dir)} (the run saved none yet); start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / META).is_file():
        raise UserError(f"--resume: {path} is not a complete hcp checkpoint folder (no {META})")
    return path


def rng_state() -> Dict[str, Any]:
    """Every global RNG that training touches."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    exp_dir: str | os.PathLike,
    step: int,
    *,
    trainable: Dict[str, torch.Tensor],
    training_state: Dict[str, Any],
    meta: Dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    root = checkpoints_dir(exp_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / TRAINABLE))
    torch.save(training_state, tmp / TRAINING_STATE)
    (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. Ctrl-C right after a periodic save)
        old = root / f".step-{step:08d}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(exp_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """(trainable tensors, training state, meta) of a checkpoint folder; never unpickles objects."""
    trainable = load_file(str(path / TRAINABLE))
    state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    meta = json.loads((path / META).read_text())
    return trainable, state, meta
