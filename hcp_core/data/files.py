"""Listing the files of a data folder (shared by the image_folder source and the caption tool).

Real folders hold broken symbolic links, links that loop, sub-folders nobody may read and links
back to a parent folder. None of these stops a scan: each becomes a
:class:`~hcp_core.interfaces.Problem` naming the path (``hcp check`` lists them), and the rest of
the folder is used. Only a root folder that cannot be listed at all is a
:class:`~hcp_core.errors.DataError`.
"""
from __future__ import annotations

import errno
import os
from typing import FrozenSet, List, Optional, Sequence, Tuple

from ..errors import DataError
from ..interfaces import Problem

SKIPPED = "skipped"


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators (the form caption files use)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def describe_os_error(exc: OSError) -> str:
    """A short reason for a file-system error, for problem lists and messages."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return exc.strerror or str(exc)


def _link_problem(path: str) -> Optional[str]:
    """What is wrong with ``path`` when it is a symbolic link that leads nowhere, else None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "broken symbolic link (a symbolic link loop)"
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"broken symbolic link (to {target!r}, which {describe_os_error(exc)})"
    return None


def folder_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a folder hcp can scan (``"is a file, not a folder"``, ``"is a broken
    symbolic link (...)"``, ``"does not exist"`` ...), or None when it is one."""
    link = _link_problem(path)
    if link is not None:
        return f"is a {link}"
    try:
        if not os.path.isdir(path):
            os.stat(path)
            return "is a file, not a folder"
        os.scandir(path).close()
    except OSError as exc:
        return "does not exist" if exc.errno == errno.ENOENT else f"cannot be read ({describe_os_error(exc)})"
    return None


def list_files(
    root: str,
    recursive: bool = True,
    skip_dirs: Optional[Sequence[str]] = None,
    problems: Optional[List[Problem]] = None,
) -> List[str]:
    """Files under ``root`` as sorted ``/``-separated relative paths.

    Hidden files and folders (names starting with ".") and the folders in ``skip_dirs`` are left
    out. Entries that cannot be used (a broken or looping symbolic link, a sub-folder that cannot
    be read, a link back to a folder being scanned, a pipe or device) are appended to
    ``problems`` (when given) and skipped. A ``root`` that cannot be listed raises
    :class:`~hcp_core.errors.DataError` naming it.
    """
    found: List[Problem] = [] if problems is None else problems
    skip = {os.path.realpath(d) for d in (skip_dirs or ())}
    out: List[str] = []
    reason = folder_problem(root)
    if reason is not None:
        raise DataError(f"data folder {root} {reason}")
    # (relative prefix, folder, real paths of it and the folders above: a link to one of them loops)
    pending: List[Tuple[str, str, FrozenSet[str]]] = [("", root, frozenset({os.path.realpath(root)}))]
    while pending:
        prefix, folder, ancestors = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            found.append(Problem(folder, f"cannot list folder ({describe_os_error(exc)})", SKIPPED))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as exc:  # ELOOP, EACCES: DirEntry only swallows ENOENT
                found.append(Problem(entry.path, _link_problem(entry.path) or describe_os_error(exc), SKIPPED))
                continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if not recursive or real in skip:
                    continue
                if real in ancestors:
                    found.append(Problem(entry.path, f"symbolic link back to the folder {real} (a loop)", SKIPPED))
                    continue
                pending.append((f"{prefix}{entry.name}/", entry.path, ancestors | {real}))
            elif is_file:
                out.append(prefix + entry.name)
            else:
                what = _link_problem(entry.path) or "not a regular file (a pipe, socket or device)"
                found.append(Problem(entry.path, what, SKIPPED))
    out.sort()
    return out
