"""Train/eval modes of modules, switched for a while and put back."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def modules_in_eval(modules: Sequence[Any]) -> Iterator[None]:
    """Eval mode inside; every submodule's train/eval mode put back on the way out."""
    modes = {m: m.training for root in modules for m in root.modules()}
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training
