"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<exp_dir>/checkpoints/step-<N>/``. It is written under a temporary
name and renamed only when every file is flushed to disk, so a kill never leaves a
half-written checkpoint that looks complete.
"""
from __future__ import annotations

import errno
import json
import logging
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
from ..fileio import apply_default_mode, fsync_folder

log = logging.getLogger("hcp")

_NAME = re.compile(r"^step-(\d+)$")
TRAINABLE = "trainable.safetensors"
TRAINING_STATE = "training_state.pt"
META = "state.json"
#: Written into a checkpoint once its user-facing exports are complete; a resume re-exports without it.
EXPORTED = "exported"


class CheckpointError(UserError):
    """A checkpoint could not be written or read; the message names the file and the way out."""


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
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, step, trainable, training_state, meta)
    except (OSError, RuntimeError) as exc:  # safetensors reports a full disk as a RuntimeError subclass
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_problem(exp_dir, final, exc) from None
    if final.exists():  # same step saved again (e.g. Ctrl-C right after a periodic save)
        old = root / f".step-{step:08d}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_folder(root)
    for stale in list_checkpoints(exp_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_files(folder: Path, step: int, trainable: Dict[str, torch.Tensor], training_state: Dict[str, Any],
                 meta: Dict[str, Any]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(folder / TRAINABLE))
    torch.save(training_state, folder / TRAINING_STATE)
    (folder / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    apply_default_mode(folder.iterdir())  # safetensors writes 0600; others on the server may read runs
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_folder(folder)


def _write_problem(exp_dir: str | os.PathLike, final: Path, exc: BaseException) -> CheckpointError:
    saved = list_checkpoints(exp_dir)
    kept = f"the last complete checkpoint, {saved[-1]}, is intact" if saved else "no earlier checkpoint exists"
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        why = "the disk is full"
        fix = "free some space and continue with --resume"
    elif getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text:
        why = "the folder is not writable"
        fix = "fix the folder's permissions and continue with --resume"
    else:
        why, fix = text, "fix the cause and continue with --resume"
    return CheckpointError(f"could not write checkpoint {final.name} in {final.parent}: {why} ({kept}); {fix}")


def mark_exported(path: Path) -> None:
    """Record that checkpoint ``path``'s exports were all written."""
    (path / EXPORTED).write_text("")


def is_exported(path: Path) -> bool:
    """Whether the exports of checkpoint ``path`` were completed."""
    return (path / EXPORTED).is_file()


def load_checkpoint(path: Path) -> tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """(trainable tensors, training state, meta) of a checkpoint folder; never unpickles objects.

    A damaged file raises :class:`CheckpointError` naming it.
    """
    readers = ((META, lambda f: json.loads(f.read_text())),
               (TRAINABLE, lambda f: load_file(str(f))),
               # mmap: processes resuming on one machine share the file's pages instead of each
               # holding its own copy of the optimizer state. Not on Windows, which cannot delete a
               # mapped file (the checkpoint may be pruned while a CPU run's moments still map it).
               (TRAINING_STATE, lambda f: torch.load(f, map_location="cpu", weights_only=True, mmap=os.name != "nt")))
    out: Dict[str, Any] = {}
    for name, read in readers:
        try:
            out[name] = read(path / name)
        except Exception as exc:  # truncated, corrupt, or holding objects torch will not load safely
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint file {path / name} is damaged or unreadable ({first[:200]})") from None
    meta = out[META]
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint file {path / META} is damaged (no step number)")
    return out[TRAINABLE], out[TRAINING_STATE], meta


def load_resume_point(exp_dir: str | os.PathLike, resume: str) -> tuple[Path, Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """The checkpoint to resume from, loaded: (folder, trainable, training state, meta).

    ``latest`` falls back to the previous complete checkpoint, with a warning, when the newest is
    damaged; an explicitly named damaged checkpoint is an error naming the broken file.
    """
    if resume != "latest":
        path = resolve_resume(exp_dir, resume)
        return (path, *load_checkpoint(path))
    found = list_checkpoints(exp_dir)
    if not found:
        resolve_resume(exp_dir, resume)  # raises the "no checkpoint" message
    problems = []
    for path in reversed(found):
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the checkpoint before it", exc)
            continue
        return (path, *loaded)
    raise CheckpointError("no usable checkpoint in " + str(checkpoints_dir(exp_dir)) + ":\n  " + "\n  ".join(problems))
