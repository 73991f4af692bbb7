"""Moving tensors made on the host during a training step onto the GPU without stalling the host.

A copy from ordinary (pageable) host memory to a CUDA device waits until the GPU has finished
everything queued before it. A step that queues the VAE encode and then copies its noise from
pageable memory leaves the host idle for the whole encode, when it could have queued the text
encoder and the denoiser meanwhile; with a small batch the step is bound by how fast the host
queues kernels, so that wait adds to the step time. From pinned (page-locked) memory the copy is
asynchronous; torch's pinned-memory cache keeps the buffer until the copy has run.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def to_device(tensor: torch.Tensor, device: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``tensor`` on ``device`` (None: where it is), then cast to ``dtype`` when given (there: a
    cast on the GPU is cheap, one of a batch of images on the host is not); a host tensor bound for
    a CUDA device goes through pinned memory and does not make the host wait."""
    device = tensor.device if device is None else torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        moved = (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    else:
        moved = tensor.to(device)
    return moved if dtype is None else moved.to(dtype)
