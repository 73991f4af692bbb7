"""Benchmark: decoded, resized and cropped samples per second per core at 512 px.

    python bench/bench_loader.py                      # 64 photos of 1024-3000 px, 2 workers
    python bench/bench_loader.py --images 200 --workers 4 --long-side 4000

Writes JPEG and PNG "photos" (smooth gradients plus noise, so they compress like photographs),
then measures the dataset of ``bucket = { type = "ratio", target_area = 512*512 }``:

- in one process (``dataset[i]`` in a loop): samples per second on one core;
- through ``DataLoader(num_workers=N)``: total samples per second, and per worker.

A training step on a GPU takes ~0.1-0.5 s for batch 4 at 512 px; the loader keeps up when
samples/s across workers exceeds batch_size / step time.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def make_photos(root: Path, n: int, long_side: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = rng.randint(long_side // 3, long_side)
        ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
        w, h = (side, int(side / ratio)) if rng.random() < 0.6 else (int(side / ratio), side)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
        noise = nprng.normal(0, 12, size=(h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
        im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        if i % 4 == 3:
            im.save(root / f"{i:04d}.png")
        else:
            im.save(root / f"{i:04d}.jpg", quality=90)
        (root / f"{i:04d}.txt").write_text(f"photo {i}, gradient, noise")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--long-side", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import torch

    from hcp_core.config import build_pipeline
    from hcp_core.data.loader import build_train_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        t0 = time.perf_counter()
        make_photos(root, args.images, args.long_side)
        print(f"wrote {args.images} photos (long side up to {args.long_side} px) in {time.perf_counter() - t0:.1f} s")
        raw = {
            "model": {"pretrained": "unused"},
            "data": {"ds": {"batch_size": args.batch_size, "num_workers": args.workers,
                            "bucket": {"type": "ratio", "target_area": 512 * 512, "num_buckets": 5},
                            "sources": [{"type": "image_folder", "img_root": str(root)}]}},
        }
        data = build_train_data(build_pipeline(raw, base_dir=tmp))
        stream = data.streams["ds"]
        dataset = stream.dataset

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        single = len(dataset) / (time.perf_counter() - t0)
        print(f"one process:        {single:7.1f} samples/s  (= per core)")

        next(stream)  # start the workers before timing
        t0 = time.perf_counter()
        n = 0
        for _ in range(max(1, stream.batches_per_epoch - 1)):
            n += next(stream)["pixel_values"].shape[0]
        total = n / (time.perf_counter() - t0)
        workers = max(1, args.workers)
        print(f"DataLoader x{args.workers}:    {total:7.1f} samples/s  ({total / workers:.1f} per worker core)")
        data.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
