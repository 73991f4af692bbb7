"""Write ``.safetensors`` files one tensor at a time, so that saving a model never copies it whole.

``safetensors.torch.save_file`` turns every tensor into bytes before it writes the first one, and
casting a model to another dtype first makes a second copy of it: saving a 10 GB model would need
up to 10 GB more. :func:`write_safetensors` writes the header from the tensors' shapes, then each
tensor cast (and moved to the CPU) on its own, written and dropped before the next; the extra
memory is about one tensor's size. :func:`write_sharded` does the same for a diffusers /
transformers part folder (``diffusion_pytorch_model*.safetensors`` or ``model*.safetensors``,
shards with an ``.index.json`` above ``shard_bytes``).

A value may also be a zero-argument callable that makes the tensor (e.g. q, k and v fused into
one matrix for an original-layout checkpoint): it is called once to learn the shape and once to
write, so a made tensor never lives longer than that either.

The file format (a little-endian u64 header length, a JSON header of name -> dtype, shape and
byte offsets, space-padded to 8 bytes, then the raw little-endian data) is safetensors' own; the
tests read the files back with ``safetensors`` and diffusers.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..fileio import PathLike, atomic_write

TensorSource = Union[torch.Tensor, Callable[[], torch.Tensor]]

#: safetensors' names of the torch dtypes hcp writes.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
#: Shards of a part folder are at most this large (transformers' and diffusers' default).
SHARD_BYTES = 5 * 1024**3


def _materialize(value: TensorSource) -> torch.Tensor:
    return value() if callable(value) and not isinstance(value, torch.Tensor) else value


def _target_dtype(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Floating-point tensors go to ``dtype`` (when given); integer and bool buffers keep theirs."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def tensor_specs(tensors: Mapping[str, TensorSource], dtype: Optional[torch.dtype]) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """Name -> (dtype as written, shape) without keeping any made tensor."""
    specs = {}
    for name, value in tensors.items():
        t = _materialize(value)
        specs[name] = (_target_dtype(t, dtype), tuple(t.shape))
        del t
    return specs


def nbytes(spec: Tuple[torch.dtype, Tuple[int, ...]]) -> int:
    """Bytes of a tensor of ``spec`` = (dtype, shape)."""
    dtype, shape = spec
    count = 1
    for side in shape:
        count *= side
    return count * torch.empty((), dtype=dtype).element_size()


def _header(specs: Mapping[str, Tuple[torch.dtype, Tuple[int, ...]]], metadata: Optional[Mapping[str, str]]) -> bytes:
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, spec in specs.items():
        if spec[0] not in DTYPE_NAMES:
            raise TypeError(f"{name}: cannot write a {spec[0]} tensor to safetensors")
        size = nbytes(spec)
        header[name] = {"dtype": DTYPE_NAMES[spec[0]], "shape": list(spec[1]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _write_stream(tmp: str, tensors: Mapping[str, TensorSource], specs, metadata) -> None:
    with open(tmp, "wb") as out:
        out.write(_header(specs, metadata))
        for name, value in tensors.items():
            dtype, shape = specs[name]
            # One tensor cast at a time: the only copy alive is this tensor's.
            t = _materialize(value).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != shape:
                raise RuntimeError(f"{name}: made a tensor of shape {tuple(t.shape)}, announced {shape}")
            if t.numel():
                out.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def write_safetensors(path: PathLike, tensors: Mapping[str, TensorSource], *, dtype: Optional[torch.dtype] = None,
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` to ``path`` atomically, floating-point ones cast to ``dtype`` (None: as
    they are), one tensor at a time; returns ``path``."""
    specs = tensor_specs(tensors, dtype)
    return atomic_write(path, lambda tmp: _write_stream(tmp, tensors, specs, metadata))


def plan_shards(specs: Mapping[str, Tuple[torch.dtype, Tuple[int, ...]]], shard_bytes: int) -> List[List[str]]:
    """Names grouped in order into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        n = nbytes(spec)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_sharded(folder: PathLike, stem: str, tensors: Mapping[str, TensorSource], *, dtype: Optional[torch.dtype] = None,
                  shard_bytes: int = SHARD_BYTES) -> List[Path]:
    """A part's weights as ``<stem>.safetensors``, or ``<stem>-0000i-of-0000n.safetensors`` shards
    plus ``<stem>.safetensors.index.json`` (the layout diffusers and transformers read), each
    written tensor by tensor; returns the files written."""
    folder = Path(folder)
    specs = tensor_specs(tensors, dtype)
    shards = plan_shards(specs, shard_bytes)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for name, keys in zip(names, shards):
        part = {k: tensors[k] for k in keys}
        written.append(atomic_write(folder / name, lambda tmp, part=part, keys=keys: _write_stream(
            tmp, part, {k: specs[k] for k in keys}, {"format": "pt"})))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(s) for s in specs.values())},
                 "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        written.append(atomic_write(folder / f"{stem}.safetensors.index.json",
                                    lambda tmp: Path(tmp).write_text(text, encoding="utf-8")))
    return written
