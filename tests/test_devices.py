"""to_device: host tensors made during a step reach the GPU without a host-side wait."""
from __future__ import annotations

import pytest
import torch

from hcp_core.devices import to_device


def test_on_the_cpu_it_is_a_plain_move_then_the_cast() -> None:
    t = torch.randn(3, 4, dtype=torch.float32)
    same = to_device(t, "cpu")
    assert same.dtype == torch.float32 and torch.equal(same, t)
    half = to_device(t, torch.device("cpu"), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, t.to(torch.bfloat16))
    assert to_device(t, None) is t  # no device: where it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_host_tensor_reaches_the_gpu_through_pinned_memory() -> None:
    t = torch.randn(64, 64)
    moved = to_device(t, "cuda", torch.bfloat16)
    assert moved.device.type == "cuda" and moved.dtype == torch.bfloat16
    assert torch.equal(moved.cpu(), t.to(torch.bfloat16))
    assert not t.is_pinned()  # the caller's tensor is left as it was
