"""Errors that reach the user as a short message (exit status 2, no traceback)."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake the user can fix: bad config, missing file, unknown name.

    The CLI prints ``str(err)`` and exits with status 2; ``--debug`` shows the traceback.
    """


class ConfigError(UserError):
    """A pipeline config that does not validate; the message names the dotted path."""


class UnknownComponentError(UserError):
    """A component name nobody registered. Deliberately not a KeyError (cattrs would misreport it)."""


class PluginConflictError(UserError):
    """Two plugins registered the same component name in one family."""


class DataError(UserError):
    """A data set that cannot be trained on (empty, missing folder, batch larger than the data)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class RunStopped(KeyboardInterrupt):
    """A run stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint.

    A ``KeyboardInterrupt`` so library code's ``except Exception`` does not swallow it; the CLI
    prints the message and exits with ``exit_code`` (128 + the signal number, as shells do).
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
