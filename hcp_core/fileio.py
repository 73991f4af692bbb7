"""Writing files safely: atomically, with the user's normal file mode, and with clear disk errors.

Every file hcp exports (LoRA weights, PNGs, embeddings, cached latents, checkpoints) is written
through :func:`atomic_write`: a temporary file in the target's folder, renamed over the target
only once complete, so a reader (or a crash) never sees half a file. ``tempfile.mkstemp`` creates
files with mode 0600; the final file gets the mode a plain ``open()`` would give it
(``0o666 & ~umask``), so a web UI running as another user on the same machine can read it.

An out-of-space, read-only or permission error becomes a :class:`FileWriteError` (a
:class:`~hcp_core.errors.UserError`) that names the path and says what to do.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .errors import UserError

PathLike = Union[str, os.PathLike]

_UMASK_LOCK = threading.Lock()
#: How Rust writers (safetensors) spell an OS error inside their own exception's message.
_RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)")


class FileWriteError(UserError):
    """A file that cannot be written: disk full, read-only file system, no permission."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which races with threads creating files; Linux
    shows it in ``/proc/self/status``, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # fallback: set and restore at once (other platforms, old kernels)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask (0644 under 022)."""
    return 0o666 & ~current_umask()


def apply_default_mode(paths: Iterable[PathLike]) -> None:
    """Give files written by another library's tempfile-and-rename (0600) the normal mode."""
    mode = default_file_mode()
    for path in paths:
        os.chmod(path, mode)


def os_error_errno(exc: BaseException) -> Optional[int]:
    """The errno behind ``exc``: an OSError's own, or one a Rust writer put into its message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = _RUST_OS_ERROR.search(str(exc))
    return int(found.group(1)) if found else None


def write_error(path: PathLike, exc: BaseException) -> Optional[FileWriteError]:
    """A :class:`FileWriteError` naming ``path`` and the fix for ``exc``, or None when ``exc`` is
    not an environmental fault a user can fix (a bug, which should keep its traceback)."""
    code = os_error_errno(exc)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        return FileWriteError(f"{what} while writing {path}; free space and resume (nothing was overwritten)")
    if code == errno.EROFS:
        return FileWriteError(f"{path} is on a read-only file system; choose an output folder you can write to")
    if code in (errno.EACCES, errno.EPERM):
        return FileWriteError(
            f"no permission to write {path}; change the folder's permissions or choose another output folder"
        )
    return None


def fsync_folder(folder: PathLike) -> None:
    """Make a rename durable; folders cannot be opened for fsync on every platform, hence the guard."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, writer: Callable[[str], None], *, durable: bool = True) -> Path:
    """Write ``path`` by calling ``writer(tmp_path)``, then rename the finished file into place.

    ``writer`` gets a path string in the target's folder and writes the whole file there, e.g.
    ``lambda tmp: save_file(tensors, tmp)``, ``lambda tmp: torch.save(obj, tmp)`` or
    ``lambda tmp: image.save(tmp, format="PNG")`` (pass a format: the temporary name ends in
    ``.tmp``). The parent folder is created. The file gets :func:`default_file_mode`. With
    ``durable`` the data and the rename are fsynced (off for caches that can be rebuilt).

    On any error the temporary file is removed and ``path`` is left as it was; a full disk, a
    read-only file system or a permission error raises :class:`FileWriteError` naming ``path``,
    other errors propagate unchanged. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    folder = str(target.parent)
    tmp: Optional[str] = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, default_file_mode())
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
        tmp = None
        if durable:
            fsync_folder(folder)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        friendly = write_error(target, exc) if isinstance(exc, Exception) else None
        if friendly is not None:
            raise friendly from exc
        raise
    return target


def atomic_folder(path: PathLike, writer: Callable[[Path], None]) -> Path:
    """Write the folder ``path`` by calling ``writer(tmp_folder)``, then rename it into place.

    The temporary folder (``.<name>.tmp-<random>`` beside ``path``) is removed on any error, so
    ``path`` either is complete or is as it was; an existing ``path`` is replaced only once the new
    one is complete (renamed aside, then deleted). Disk errors become :class:`FileWriteError`
    naming ``path``, as in :func:`atomic_write`. Returns ``path``.
    """
    import shutil

    target = Path(path)
    tmp: Optional[Path] = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent)))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; others on the server may read runs
        writer(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=str(target.parent)))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_folder(str(target.parent))
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        friendly = write_error(target, exc) if isinstance(exc, Exception) else None
        if friendly is not None:
            raise friendly from exc
        raise
    return target
