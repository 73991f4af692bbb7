"""LoHa and LoKr (LyCORIS): their weight updates, the trainable branch, and a file's layer.

Formulas (``*`` elementwise, ``@`` matrix product, ``kron`` the Kronecker product), for a host
weight ``W`` of shape ``(out, in)`` or ``(out, in, kh, kw)``:

- LoHa: ``dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank`` with
  ``hada_w*_a`` ``(out, rank)`` and ``hada_w*_b`` ``(rank, in * kh * kw)``, reshaped to ``W``'s shape.
- LoKr: ``dW = kron(w1, w2) * scale``; ``w1`` is ``(out_l, in_m)`` (``lokr_w1``, or
  ``lokr_w1_a @ lokr_w1_b`` with ``decompose_both``), ``w2`` is ``(out_k, in_n[, kh, kw])``
  (``lokr_w2``, or ``lokr_w2_a @ lokr_w2_b`` reshaped), where ``out = out_l * out_k`` and
  ``in = in_m * in_n`` (:func:`factorization`). ``scale = alpha / rank`` where a factor is
  low-rank, else 1 (LyCORIS then stores ``alpha = rank``).

These are the updates LyCORIS trains and webui and ComfyUI apply to such files; the branch adds
``dW x`` (a Linear) or ``conv(x, dW)`` with the host's stride, padding and dilation to the host's
output, so the trained layer is exactly ``W + dW``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.layer import host_shape

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: LyCORIS's split of a LoKr dimension.

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)`` (ordered). Otherwise
    the divisor pair closest to balanced whose smaller side is at most ``factor`` (any with -1):
    128 -> (8, 16); 250 -> (10, 25); 360 with factor 8 -> (8, 45); a prime p -> (1, p).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float() @ b.float().reshape(b.shape[0], -1)


def lycoris_delta(algo: str, t: Mapping[str, torch.Tensor], scale: float, shape: Sequence[int]) -> torch.Tensor:
    """The update ``dW`` (float32, shaped ``shape``) of one LoHa or LoKr layer; see the module docstring."""
    if algo == "loha":
        dw = _product(t["hada_w1_a"], t["hada_w1_b"]) * _product(t["hada_w2_a"], t["hada_w2_b"])
        return (dw * scale).reshape(shape)
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else _product(t["lokr_w1_a"], t["lokr_w1_b"])
    kernel = tuple(shape[2:])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    else:
        w2 = _product(t["lokr_w2_a"], t["lokr_w2_b"])
        w2 = w2.reshape(w2.shape[0], -1, *kernel)
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return (torch.kron(w1, w2) * scale).reshape(shape)


def lycoris_rank(algo: str, t: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The rank alpha is divided by: LoHa's, or a LoKr low-rank factor's (None: both LoKr factors full)."""
    if algo == "loha":
        return int(t["hada_w1_b"].shape[0])
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in t:
            return int(t[key].shape[0])
    return None


@dataclass
class LycorisWeights:
    """One LoHa / LoKr layer as a file holds it: its tensors by key suffix and its alpha (None: left out)."""

    algo: str
    tensors: Dict[str, torch.Tensor]
    alpha: Optional[float]

    @property
    def rank(self) -> int:
        """The rank alpha is divided by (LoKr with two full factors: its ``alpha``, so scale 1)."""
        rank = lycoris_rank(self.algo, self.tensors)
        return rank if rank is not None else int(self.alpha or 1)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without alpha, or for a LoKr without a low-rank factor), as webui and ComfyUI."""
        rank = lycoris_rank(self.algo, self.tensors)
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def delta_for(self, base: torch.Tensor) -> torch.Tensor:
        """The update for a host weight like ``base`` (its shape; the values do not matter)."""
        return lycoris_delta(self.algo, self.tensors, self.scale, base.shape).to(base.device)

    def delta_shape(self) -> Tuple[int, ...]:
        """(out, in * kh * kw) of the update as a matrix (to check it against a host weight)."""
        t = self.tensors
        if self.algo == "loha":
            return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"][0].numel())
        w1 = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        w2 = (t["lokr_w2"].shape[0], t["lokr_w2"][0].numel()) if "lokr_w2" in t else (
            t["lokr_w2_a"].shape[0], t["lokr_w2_b"][0].numel())
        return int(w1[0] * w2[0]), int(w1[1] * w2[1])


def lycoris_shapes(algo: str, host: nn.Module, rank: int, *, factor: int = -1, decompose_both: bool = False,
                   full_matrix: bool = False) -> Dict[str, Tuple[int, ...]]:  # fmt: skip
    """The tensors (key suffix -> shape) of a fresh LoHa / LoKr layer on ``host``, LyCORIS's choices."""
    in_ch, out_ch = host_shape(host)
    kernel = tuple(host.kernel_size) if isinstance(host, nn.Conv2d) else ()
    if algo == "loha":
        flat_in = in_ch * math.prod(kernel)
        return {"hada_w1_a": (out_ch, rank), "hada_w1_b": (rank, flat_in),
                "hada_w2_a": (out_ch, rank), "hada_w2_b": (rank, flat_in)}  # fmt: skip
    in_m, in_n = factorization(in_ch, factor)
    out_l, out_k = factorization(out_ch, factor)
    shapes: Dict[str, Tuple[int, ...]] = {}
    if decompose_both and rank < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if full_matrix or rank >= max(out_k, in_n) / 2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    else:
        shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n * math.prod(kernel)))
    return shapes


def _uniform_fan_in(shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
    """kaiming_uniform with a = sqrt(5) (PyTorch's default Linear init): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def initial_tensor(key: str, shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
    """LyCORIS's start for each tensor; one factor of each product is zero, so ``dW = 0`` at step 0."""
    if key in ("hada_w1_b", "hada_w2_b"):
        return torch.randn(shape, generator=generator)
    if key == "hada_w1_a":
        return torch.randn(shape, generator=generator) * 0.1
    if key in ("hada_w2_a", "lokr_w2", "lokr_w2_b"):
        return torch.zeros(shape)
    return _uniform_fan_in(shape, generator)


class LycorisBranch(nn.Module):
    """A trainable LoHa / LoKr update on one Linear or Conv2d (see the module docstring)."""

    hcp_adapter_branch = True  # layer selection does not look inside
    needs_host = True  # it applies its update with the host's convolution settings

    def __init__(self, host: nn.Module, algo: str, shapes: Mapping[str, Tuple[int, ...]], rank: int, alpha: float,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.algo = algo
        self.keys = tuple(shapes)
        self.shape = tuple(host.weight.shape)
        for key, shape in shapes.items():
            self.register_parameter(key, nn.Parameter(torch.zeros(shape, device=host.weight.device)))
        low_rank = lycoris_rank(algo, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
        self.rank = self.requested_rank = int(rank)
        #: LoKr without a low-rank factor has scale 1 and stores alpha = rank, as LyCORIS does.
        self.alpha = float(alpha) if low_rank is not None else float(rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The trained tensors by their file key suffix (live parameters)."""
        return {key: getattr(self, key) for key in self.keys}

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        """LyCORIS's start (see :func:`initial_tensor`)."""
        with torch.no_grad():
            for key, tensor in self.state_tensors().items():
                tensor.copy_(initial_tensor(key, tuple(tensor.shape), generator))

    def delta_weight(self) -> torch.Tensor:
        """``dW`` shaped like the host weight, float32."""
        return lycoris_delta(self.algo, self.state_tensors(), self.scale, self.shape)

    def forward(self, x: torch.Tensor, host: nn.Module, output: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(delta.dtype)
        x = self.dropout(x)
        if isinstance(host, nn.Conv2d):
            return host._conv_forward(x, delta, None)
        return F.linear(x, delta)

    def weights(self) -> LycorisWeights:
        """This layer as a file stores it (float32 copies)."""
        return LycorisWeights(self.algo, {k: v.detach().float().clone() for k, v in self.state_tensors().items()}, self.alpha)
