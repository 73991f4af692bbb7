"""svd_init: start a LoRA from the host weight's top singular vectors.

With ``W = U S Vh`` and the top ``r`` triplets, ``up = U_r sqrt(S_r / scale)`` and
``down = sqrt(S_r / scale) Vh_r`` so that ``scale * up @ down = W_r``, the best rank-``r``
approximation of ``W``. The host keeps ``W - W_r``, hence the model's output at step 0 equals the
base model's. The starting factors are kept in the branch (``svd_down0`` / ``svd_up0``): relative
to the ORIGINAL base weight the trained update is ``scale * (up @ down - up0 @ down0)``, which is
what the exported file carries (as one LoRA of rank ``2r``, see :func:`export_factors`).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .layer import LoraBranch, delta_from_factors


def max_svd_rank(host: nn.Module) -> int:
    """The largest rank an SVD of the host weight has: min(out, in * kernel area)."""
    w = host.weight
    return min(w.shape[0], w[0].numel())


def svd_init(host: nn.Module, branch: LoraBranch) -> None:
    """Initialise ``branch`` from the host's SVD and reduce the host weight by what it took."""
    w = host.weight.detach().float()
    out_ch = w.shape[0]
    rank = branch.rank
    u, s, vh = torch.linalg.svd(w.reshape(out_ch, -1), full_matrices=False)
    root = torch.sqrt(s[:rank] / branch.scale)
    up = u[:, :rank] * root  # (out, r)
    down = root[:, None] * vh[:rank]  # (r, in * k * k)
    with torch.no_grad():
        branch.up.weight.copy_(up.reshape(branch.up.weight.shape))
        branch.down.weight.copy_(down.reshape(branch.down.weight.shape))
        branch.svd_up0 = branch.up.weight.detach().clone()
        branch.svd_down0 = branch.down.weight.detach().clone()
        reduced = w - delta_from_factors(branch.svd_down0, branch.svd_up0, branch.scale)
        host.weight.copy_(reduced.to(host.weight.dtype))


def restore_svd_start(host: nn.Module, branch: LoraBranch, down0: torch.Tensor, up0: torch.Tensor) -> None:
    """Make ``down0``/``up0`` the branch's starting factors (resuming a checkpoint).

    The host weight is re-based so that ``host + scale * up0 @ down0`` stays the original weight,
    even if this process's SVD came out with different signs than the checkpoint's.
    """
    with torch.no_grad():
        w = host.weight.float()
        if branch.svd_down0 is not None:
            w = w + delta_from_factors(branch.svd_down0, branch.svd_up0, branch.scale)
        device = branch.down.weight.device
        branch.svd_down0 = down0.detach().to(device, torch.float32).clone()
        branch.svd_up0 = up0.detach().to(device, torch.float32).clone()
        w = w - delta_from_factors(branch.svd_down0, branch.svd_up0, branch.scale)
        host.weight.copy_(w.to(host.weight.dtype))


def export_factors(branch: LoraBranch) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of one LoRA that, applied to the ORIGINAL host weight, gives the trained layer.

    Without svd_init that is the branch itself. With it, the update relative to the original
    weight is ``scale * (up @ down - up0 @ down0)``: stacking ``[down; down0]`` and ``[up, -up0]``
    writes it exactly as a LoRA of rank ``2r``, with alpha doubled so the scale is unchanged.
    """
    down = branch.down.weight.detach().float()
    up = branch.up.weight.detach().float()
    if branch.svd_down0 is None:
        return down, up, branch.alpha
    # .to(): under FSDP an export reads the trained factors gathered into CPU memory
    down = torch.cat([down, branch.svd_down0.float().to(down.device)], dim=0)
    up = torch.cat([up, -branch.svd_up0.float().to(up.device)], dim=1)
    return down, up, branch.scale * down.shape[0]
