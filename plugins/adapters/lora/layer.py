"""The LoRA branch: a low-rank update added to the output of one nn.Linear or nn.Conv2d.

``host(x) + scale * up(down(dropout(x)))`` with ``scale = alpha / rank``. For a convolution,
``down`` is a convolution with the host's kernel, stride, padding, dilation and padding mode and
``up`` is 1x1, so the update equals a convolution with kernel ``scale * up @ down`` (what merging
and every LoRA file format assume).

The branch is registered *inside* its host (as ``host.hcp_lora``) so that moving the model
(``.to(device)``, DDP, accelerate) moves and synchronises it too, and it runs through a forward
hook so the host keeps its class and its parameter names.

A rank above what the host can use (:func:`max_rank`) is capped: the update ``up @ down`` of a
layer cannot have a higher rank than its weight matrix's smaller side, so more only costs memory.

Dropout draws from the global torch RNG on purpose: ``torch.utils.checkpoint`` (gradient
checkpointing) restores that RNG when it recomputes a forward, so the recomputed masks match the
original ones; a private generator would not be restored. Resume stays exact because the data
loader never draws from the global RNG and checkpoints save and restore it.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Attribute name of the branch inside its host.
BRANCH_ATTR = "hcp_lora"


def rank_for(rank: int | float, out_channels: int) -> int:
    """The actual rank: an int as is, a float as a fraction of ``out_channels`` (at least 1)."""
    if isinstance(rank, float):
        return max(1, int(round(out_channels * rank)))
    return int(rank)


def host_shape(host: nn.Module) -> Tuple[int, int]:
    """(input features or channels, output features or channels) of a Linear/Conv2d."""
    if isinstance(host, nn.Linear):
        return host.in_features, host.out_features
    if isinstance(host, nn.Conv2d):
        return host.in_channels, host.out_channels
    raise TypeError(f"LoRA needs an nn.Linear or nn.Conv2d, got {type(host).__name__}")


def max_rank(host: nn.Module) -> int:
    """The highest rank a LoRA on ``host`` can use: the smaller side of its weight as a matrix.

    ``min(in_features, out_features)`` for a Linear, ``min(in_channels / groups * kh * kw,
    out_channels)`` for a Conv2d (whose update is an ``out x (in * kh * kw)`` matrix).
    """
    in_ch, out_ch = host_shape(host)
    if isinstance(host, nn.Conv2d):
        kh, kw = host.kernel_size
        return min(in_ch // host.groups * kh * kw, out_ch)
    return min(in_ch, out_ch)


def warn_capped_ranks(layers: Mapping[str, "LoraBranch"]) -> int:
    """Log one warning summarising the layers (name -> branch) whose rank was capped; returns their count."""
    capped = {name: b for name, b in layers.items() if b.rank < b.requested_rank}
    if capped:
        name, example = next(iter(capped.items()))
        log.warning(
            "%d of %d LoRA layers cannot use the rank asked for; each uses the size of its layer instead "
            "(e.g. %s: rank %d -> %d)", len(capped), len(layers), name, example.requested_rank, example.rank,
        )
    return len(capped)


class LoraBranch(nn.Module):
    """The trainable low-rank part; see the module docstring for the formula."""

    #: Tells layer selection not to look inside (see hcp_core.models.layer_select).
    hcp_adapter_branch = True

    def __init__(self, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, cap: bool = True) -> None:
        super().__init__()
        in_ch, out_ch = host_shape(host)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        #: What was asked for; ``rank`` is that capped to :func:`max_rank` (see warn_capped_ranks).
        #: ``cap=False`` keeps a rank read from a file, so continuing from it is exact.
        self.requested_rank = rank
        rank = min(rank, max_rank(host)) if cap else rank
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": host.weight.device, "dtype": torch.float32}
        if isinstance(host, nn.Conv2d):
            self.down = nn.Conv2d(
                in_ch, rank, host.kernel_size, stride=host.stride, padding=host.padding,
                dilation=host.dilation, padding_mode=host.padding_mode, bias=False, **factory,
            )
            self.up = nn.Conv2d(rank, out_ch, 1, bias=False, **factory)
        else:
            self.down = nn.Linear(in_ch, rank, bias=False, **factory)
            self.up = nn.Linear(rank, out_ch, bias=False, **factory)
        # svd_init: the factors the host weight was reduced by (empty when not used).
        self.register_buffer("svd_down0", None, persistent=False)
        self.register_buffer("svd_up0", None, persistent=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        """Standard LoRA start: ``down`` like a default Linear init, ``up`` zero (no change at step 0)."""
        w = self.down.weight
        fan_in = w[0].numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5), as nn.Linear does
        with torch.no_grad():
            w.copy_(torch.empty(w.shape, dtype=w.dtype).uniform_(-bound, bound, generator=generator))
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the factors are cast to the autocast dtype like every other weight, so the
        # half-precision activation is used as is (no fp32 copy of it); the factors stay fp32
        # master weights. Without autocast, the input meets the factors' dtype.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.down.weight.dtype)
        if not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
        out = self.up(self.down(x))
        # alpha == rank (scale 1, a common choice) needs no multiply: one kernel less each way per
        # layer, which counts when a small batch makes the step bound by kernel launches.
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` shaped like the host weight, in float32."""
        return delta_from_factors(self.down.weight, self.up.weight, self.scale)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The trained tensors by the suffix checkpoints store them under (live parameters)."""
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}


def delta_from_factors(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * up @ down`` for Linear (2-D) or Conv2d (4-D, ``up`` 1x1) factors, in float32."""
    rank = down.shape[0]
    flat = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return (flat * scale).reshape(up.shape[0], *down.shape[1:])


def _add_branch_output(host: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    branch = getattr(host, BRANCH_ATTR)
    # A branch that needs the host's weight or output (DoRA, LoHa, LoKr) says so with ``needs_host``.
    change = branch(inputs[0], host, output) if getattr(branch, "needs_host", False) else branch(inputs[0])
    return output + change.to(output.dtype)


def attach_branch(host: nn.Module, branch: nn.Module) -> None:
    """Put ``branch`` into ``host``: its output is added to the host's from now on.

    Any adapter branch works: ``branch(x)``, or ``branch(x, host, output)`` when the branch sets
    ``needs_host = True``, returns what is added to the host's output.
    """
    if BRANCH_ATTR in host._modules:
        raise ValueError(f"this {type(host).__name__} already has a LoRA branch")
    host.add_module(BRANCH_ATTR, branch)
    host.register_forward_hook(_add_branch_output)


def detach_branch(host: nn.Module) -> nn.Module:
    """Take the branch out of ``host`` (undoing any svd_init reduction of the host weight)."""
    branch = host._modules.pop(BRANCH_ATTR)
    # Found by identity rather than kept as a handle, so copies of the model detach correctly.
    for hook_id, hook in list(host._forward_hooks.items()):
        if hook is _add_branch_output:
            del host._forward_hooks[hook_id]
    if getattr(branch, "svd_down0", None) is not None:
        with torch.no_grad():
            restored = host.weight.float() + delta_from_factors(branch.svd_down0, branch.svd_up0, branch.scale)
            host.weight.copy_(restored.to(host.weight.dtype))
    return branch


def branches(model: nn.Module) -> Iterator[Tuple[str, nn.Module, LoraBranch]]:
    """(host name, host, branch) for every LoRA branch inside ``model``."""
    for name, module in model.named_modules():
        branch = module._modules.get(BRANCH_ATTR)
        if isinstance(branch, LoraBranch):
            yield name, module, branch
