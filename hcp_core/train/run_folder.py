"""The run folder (``exp_dir``): one run per folder, one process at a time, nothing overwritten.

A fresh run refuses a folder that already holds another run (its config, checkpoints, exports
or log) unless asked to ``--overwrite``, which first moves the old run aside to
``<exp_dir>.old-<time>``; it is never deleted. A lock file names the process that owns the
folder, so a second run on it stops at once; a lock left by a dead process on this host is
taken over. Leftovers of killed saves (``.step-N.tmp-PID``) are removed when a run starts.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import List, Optional

from ..errors import UserError
from .checkpoint import checkpoints_dir, list_checkpoints

LOCK_NAME = ".hcp-run.lock"
#: Files and folders that mark a folder as holding a run (the latent cache may be shared).
RUN_MARKERS = ("config.toml", "train.log", "checkpoints", "embeddings", "samples", "logs")
#: The folder under exp_dir of ``model.cache_text``'s encodings (text_cache.py).
TEXT_CACHE_DIR = "text_cache"
#: Kept in place by --overwrite: reusable, and not part of a run's results.
KEPT_ON_OVERWRITE = ("latent_cache", TEXT_CACHE_DIR, LOCK_NAME)


class RunFolderError(UserError):
    """The run folder cannot be used as asked (holds another run, locked, not writable)."""


def _os_problem(path: Path, exc: OSError) -> RunFolderError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunFolderError(f"exp_dir {path} is not writable ({exc.strerror}); choose another exp_dir or fix its permissions")
    if exc.errno == errno.ENOSPC:
        return RunFolderError(f"no space left on the device of exp_dir {path}; free some space")
    return RunFolderError(f"exp_dir {path}: {exc.strerror or exc}")


def previous_run(path: Path) -> List[str]:
    """What in ``path`` belongs to an earlier run (empty when the folder is free)."""
    if not path.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    found += sorted(p.name for p in path.glob("*.safetensors"))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """An exclusive lock file in the run folder, naming its owner (pid, host, start time)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.held = False
        #: What opening the folder did, logged once the run's log file exists.
        self.notes: List[str] = []

    def acquire(self) -> None:
        """Take the lock, taking over a stale one of a dead process on this host."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    self.notes.append(f"took over the stale lock of process {owner.get('pid')} (no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                if owner is None:  # written half by a process killed mid-write: nobody can own it
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunFolderError(
                    f"another hcp run (process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}) "
                    f"is using exp_dir {self.path.parent}; wait for it to end or choose another exp_dir. If that process "
                    f"is gone (another machine crashed), delete {self.path}"
                ) from None
            except OSError as exc:
                raise _os_problem(self.path.parent, exc) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}; delete it if no run uses this folder")

    def _owner(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def remove_leftovers(path: Path) -> List[Path]:
    """Delete half-written checkpoints of killed saves (the lock proves no save is running)."""
    root = checkpoints_dir(path)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _archive(path: Path) -> Path:
    """Move the run in ``path`` aside (all but the latent cache and the lock) and return where."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.old-{stamp}-{n}")
    dest.mkdir(parents=True)
    for child in path.iterdir():
        if child.name not in KEPT_ON_OVERWRITE:
            child.rename(dest / child.name)
    return dest


def open_run_folder(path: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Make ``path`` ready for this run (main process only) and return its held lock.

    Fresh runs refuse a folder holding another run unless ``overwrite``; resumed runs need one.
    """
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"exp_dir {path} is a file, not a folder; choose another exp_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_problem(path, exc) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"exp_dir {path} is not writable; choose another exp_dir or fix its permissions")
    lock = RunLock(path)
    lock.acquire()
    try:
        if remove_leftovers(path):
            lock.notes.append("removed the unfinished checkpoint folder(s) of an earlier killed save")
        held = previous_run(path)
        if held and not resume:
            if not overwrite:
                saved = list_checkpoints(path)
                last = f" (last checkpoint: {saved[-1].name})" if saved else ""
                raise RunFolderError(
                    f"exp_dir {path} already holds a run{last}: {', '.join(held)}. Continue it with --resume, "
                    f"choose another exp_dir (e.g. exp_dir={path}-2), or pass --overwrite to move the old run "
                    f"to {path.name}.old-<time> first"
                )
            try:
                moved = _archive(path)
            except OSError as exc:
                raise _os_problem(path, exc) from None
            lock.notes.append(f"--overwrite: moved the previous run in {path} to {moved}")
    except BaseException:
        lock.release()
        raise
    return lock
