"""Frozen denoiser weights stored in 8-bit floats (``model.fp8_base``), upcast for each forward.

FLUX.1's transformer has 12B parameters: 24 GB in bf16, 12 GB in ``float8_e4m3fn``. Like kohya's
``--fp8_base``, hcp can keep the *frozen* ``nn.Linear`` weights of the denoiser (UNet or
transformer) in ``torch.float8_e4m3fn`` and cast each one to the input's dtype inside its own
forward, so only one layer's weight at a time exists in 16/32 bits. Trained weights (fine-tuned
layers, LoRA factors, embeddings) are never touched, nor biases, norms or convolutions.

The stored weight is rounded to fp8 once (3 mantissa bits): the layer computes with
``w.to(float8_e4m3fn).to(dtype)``, not ``w``. That is a (small) change of the model, which is why
this is an opt-in memory option and not a default.

A layer that hosts an adapter branch reading its weight (``needs_host = True``, e.g. DoRA's
norm of ``W + dW``) or rewriting it (LoRA's ``svd_init``) keeps its weight as it is; branches that
only add to the output (LoRA) work unchanged: they run in the forward hook after the upcast forward.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ..errors import UserError

#: The 8-bit format weights are stored in (4 exponent, 3 mantissa bits: range +-448).
FP8_DTYPE_NAME = "float8_e4m3fn"


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; a :class:`UserError` naming the option where this torch lacks it."""
    dtype: Optional[torch.dtype] = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise UserError(f"model.fp8_base = true needs torch.{FP8_DTYPE_NAME} (PyTorch 2.1 or newer); this torch "
                        f"{torch.__version__} lacks it: upgrade torch or set fp8_base = false")
    return dtype


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer computes in: autocast's dtype where autocast is on (so the weight goes from
    8 straight to 16 bits), else the input's."""
    device = x.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # torch before 2.4 has no per-device autocast queries
        pass
    return x.dtype


def _upcast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with the fp8 weight cast to the compute dtype for this call only."""
    dtype = _compute_dtype(x)
    bias = None if self.bias is None else self.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias)


def _keeps_its_weight(module: nn.Module) -> bool:
    """Trained, or hosting an adapter branch that reads the host weight (``needs_host``) or
    rewrites it (LoRA's ``svd_init`` keeps its start in ``svd_down0`` and restores the weight)."""
    if module.weight.requires_grad:
        return True
    return any(getattr(child, "needs_host", False) or getattr(child, "svd_down0", None) is not None
               for child in module.children())


def store_linears_in_fp8(model: nn.Module) -> int:
    """Store the frozen ``nn.Linear`` weights of ``model`` as ``float8_e4m3fn``, each upcast to its
    input's dtype in its forward; return how many layers were converted."""
    dtype = fp8_dtype()
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or _keeps_its_weight(module) or module.weight.dtype == dtype:
            continue
        module.weight.data = module.weight.data.to(dtype)
        module.forward = types.MethodType(_upcast_forward, module)
        count += 1
    return count
