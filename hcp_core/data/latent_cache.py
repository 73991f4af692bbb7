"""VAE latents computed once per (image, bucket size, crop) and kept on disk.

Only for buckets whose crops are deterministic (``crop = "center"``): then one image in one
bucket always gives the same pixels, so its latent distribution can be stored.

Layout: ``<cache_dir>/<vae fingerprint>/<key[:2]>/<key>.safetensors`` holding the encoder's
``mean`` and ``std``. The fingerprint hashes the VAE's config and encoder weights (and dtype);
the key hashes the image file (path, size in bytes, modification time), the bucket size, the
resize and crop box, the background colour transparent images are composited on, and whether the
crop is mirrored. Change any of them and the old entry is simply never looked up again: stale
latents cannot be reused. A dataset with ``flip`` > 0 caches both the plain and the mirrored crop
of every image (the VAE is not mirror-symmetric, so mirrored latents are encoded, not flipped).

Each sample still draws fresh latents ``mean + std * noise`` (noise seeded per sample and epoch),
scaled like diffusers' training scripts: ``(z - shift_factor) * scaling_factor``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..fileio import atomic_write
from ..interfaces import CropPlan, Size
from .images import RGB, BadImage

log = logging.getLogger("hcp.data")

CACHE_VERSION = 1
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def vae_fingerprint(vae: Any) -> str:
    """A hash of the VAE's config, dtype and the weights that produce latents (encoder, quant_conv)."""
    h = hashlib.sha256()
    config = dict(getattr(vae, "config", {}) or {})
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = vae.state_dict()
    names = [n for n in state if n.startswith(_ENCODER_PREFIXES)] or list(state)
    for name in sorted(names):
        tensor = state[name].detach()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def entry_key(image: str, bucket: Size, plan: CropPlan, background: RGB, *, flipped: bool = False) -> str:
    """The cache key of one image's latents in one bucket under one crop, mirrored or not."""
    try:
        stat = os.stat(image)
        file_id = [os.path.abspath(image), stat.st_size, stat.st_mtime_ns]
    except OSError:
        file_id = [os.path.abspath(image), -1, -1]
    parts = {
        "v": CACHE_VERSION,
        "file": file_id,
        "bucket": list(bucket),
        "resize": list(plan.resize),
        "box": list(plan.box),
        "background": list(background),
    }
    if flipped:  # only then: unmirrored entries keep the keys earlier versions wrote
        parts["flip"] = True
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _entry_path(folder: str, key: str) -> str:
    return os.path.join(folder, key[:2], f"{key}.safetensors")


def _seed_from(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class LatentReader:
    """Loads cached latents in DataLoader workers (picklable: paths and two numbers)."""

    def __init__(self, folder: str, scaling_factor: float, shift_factor: Optional[float] = None) -> None:
        self.folder = folder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)

    def load(self, key: str, noise_seed: str) -> torch.Tensor:
        """Scaled latents [C, h, w] drawn from the cached distribution; BadImage if not cached."""
        from safetensors.torch import load_file

        path = _entry_path(self.folder, key)
        if not os.path.exists(path):
            raise BadImage(f"no cached latents ({path}); its image could not be encoded when the cache was filled")
        entry = load_file(path)
        gen = torch.Generator().manual_seed(_seed_from(noise_seed))
        z = entry["mean"] + entry["std"] * torch.randn(entry["mean"].shape, generator=gen)
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return z * self.scaling_factor


class LatentCache:
    """The cache folder of one dataset; :meth:`fill` encodes what is missing."""

    def __init__(self, root: str) -> None:
        self.root = root

    def fill(
        self,
        dataset: Any,
        vae: Any,
        *,
        device: Any = "cpu",
        dtype: Optional[torch.dtype] = None,
        batch_size: int = 4,
        rank: int = 0,
        world_size: int = 1,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> LatentReader:
        """Encode every record of ``dataset`` (a BucketDataset) not cached yet; return its reader.

        With several processes, rank r encodes records r, r + N, ...; call the returned reader's
        dataset hookup (``dataset.use_latents``) only after every rank finished (a barrier).
        Images that fail to decode are logged and left out (the dataset replaces them).
        """
        if not dataset.bucket.deterministic:
            raise ValueError(f"data.{dataset.name}: latents can only be cached with deterministic crops (crop = 'center')")
        # The fingerprint hashes the weights' dtype, so a model.vae_dtype change starts a new folder;
        # encoding in another dtype than the weights' (an explicit ``dtype``) gets its own folder too.
        fingerprint = vae_fingerprint(vae)
        weights_dtype = next(vae.parameters()).dtype
        dtype = dtype or weights_dtype
        if dtype != weights_dtype:
            fingerprint += "-" + str(dtype).replace("torch.", "")
        folder = os.path.join(self.root, fingerprint)
        todo: Dict[Size, List[tuple]] = {}
        reused = 0
        mirrors = (False, True) if getattr(dataset, "flip", 0) > 0 else (False,)
        for record_index in range(rank, len(dataset.records), world_size):
            bucket, plan = dataset.plan(record_index, None)
            for flipped in mirrors:
                key = dataset.latent_key(record_index, plan, flipped)
                if os.path.exists(_entry_path(folder, key)):
                    reused += 1
                else:
                    todo.setdefault(bucket, []).append((record_index, plan, flipped, key))
        total = sum(len(v) for v in todo.values())
        done = failed = 0
        for items in todo.values():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                pixels, keys = [], []
                for record_index, plan, flipped, key in chunk:
                    try:
                        pixels.append(dataset.load_pixels(record_index, plan, flipped))
                        keys.append(key)
                    except (BadImage, OSError) as exc:
                        failed += 1
                        log.warning("data.%s: cannot encode %s (%s); skipped", dataset.name, dataset.records[record_index].image, exc)
                if pixels:
                    self._encode_and_save(vae, torch.stack(pixels), keys, folder, device, dtype)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        log.info("data.%s: latent cache %s: %d reused, %d encoded, %d failed", dataset.name, folder, reused, total - failed, failed)
        config = getattr(vae, "config", {})
        return LatentReader(folder, _config_value(config, "scaling_factor", 0.18215), _config_value(config, "shift_factor", None))

    @staticmethod
    def _encode_and_save(vae: Any, pixels: torch.Tensor, keys: Sequence[str], folder: str, device: Any, dtype: torch.dtype) -> None:
        from safetensors.torch import save_file

        with torch.no_grad():
            dist = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        for i, key in enumerate(keys):
            entry = {"mean": mean[i].contiguous(), "std": std[i].contiguous()}
            # Atomic, so a crash or a second process never leaves half a file; not fsynced: a
            # lost entry is just encoded again.
            atomic_write(_entry_path(folder, key), lambda tmp, entry=entry: save_file(entry, tmp), durable=False)


def _config_value(config: Any, name: str, default: Any) -> Any:
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value
