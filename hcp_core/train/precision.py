"""``model.mixed_precision``: what a run computes in, chosen for the hardware when ``"auto"``.

``auto`` (the default) picks bf16 on CUDA GPUs that support it, fp16 (with accelerate's gradient
scaler) on older GPUs, and fp32 on CPUs: bf16 autocast on CPU is fast on some processors and
several times slower on others (docs/training.md, Performance), so it is used there only when
asked for. fp16 on a CPU is refused: PyTorch's CPU autocast would not use it.
"""
from __future__ import annotations

from typing import Tuple

from ..errors import ConfigError


def choose_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> Tuple[str, str]:
    """(accelerate's mixed_precision value, why) for ``requested`` on this machine."""
    if requested == "auto":
        if not cuda:
            return "no", "auto: fp32 on CPU (bf16 autocast is much slower on some CPUs; set \"bf16\" to try it)"
        if bf16_supported:
            return "bf16", "auto: bf16 on a CUDA GPU that supports it"
        return "fp16", "auto: fp16 with a gradient scaler on a CUDA GPU without bf16"
    if requested == "fp16" and not cuda:
        raise ConfigError("model.mixed_precision = \"fp16\" needs a CUDA GPU; on a CPU use \"auto\" (fp32) or \"bf16\"")
    if requested == "bf16" and cuda and not bf16_supported:
        raise ConfigError("model.mixed_precision = \"bf16\": this GPU does not support bf16; use \"auto\" or \"fp16\"")
    return requested, f"as configured ({requested})"


def machine_precision(requested: str) -> Tuple[str, str]:
    """:func:`choose_precision` for this process's hardware."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(requested, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
