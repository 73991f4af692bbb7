"""Benchmark: bucket assignment for many images from headers only, and how memory grows.

    python bench/bench_buckets.py                 # 10k, 30k and 100k images
    python bench/bench_buckets.py --sizes 100000  # one size

For each size a child process builds a folder of real-looking image files (PNG and JPEG headers
that claim photo sizes between 256 and 4096 px, with tiny pixel data), then times
``prepare_dataset`` with ``bucket = { type = "ratio", from = "images", num_buckets = 8, max_ratio = 3 }``: scan
(headers only), k-means, assignment. Peak memory (max RSS) is measured in the child, so the
sizes can be compared: it should grow about linearly (no pixels are ever held).
Target: 100,000 images in under 30 s.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path


def _png_template() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_template() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 130, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _png_with_size(template: bytes, w: int, h: int) -> bytes:
    # IHDR starts at byte 8: length (4), type (4), data (13), CRC (4); width and height lead the data.
    data = struct.pack(">II", w, h) + template[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + data) & 0xFFFFFFFF)
    return template[:16] + data + crc + template[33:]


def _jpeg_with_size(template: bytes, w: int, h: int) -> bytes:
    i = template.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    return template[: i + 5] + struct.pack(">HH", h, w) + template[i + 9 :]


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """``n`` image files with mixed aspect ratios (portrait, square, landscape, panoramas)."""
    rng = random.Random(seed)
    png, jpg = _png_template(), _jpeg_template()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        long_side = rng.randint(256, 4096)
        ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 2.5]) * rng.uniform(0.95, 1.05)
        w, h = long_side, max(64, int(long_side / ratio))
        if rng.random() < 0.4:
            w, h = h, w
        if i % 2:
            (root / f"{i:06d}.jpg").write_bytes(_jpeg_with_size(jpg, w, h))
        else:
            (root / f"{i:06d}.png").write_bytes(_png_with_size(png, w, h))


def run_one(n: int, workdir: Path) -> dict:
    """Build the folder (not timed), then time preparing the dataset."""
    root = workdir / f"imgs_{n}"
    if not root.exists():
        make_folder(root, n)
    from hcp_core.config import build_pipeline
    from hcp_core.data.prepare import prepare_dataset
    from hcp_core.data.report import bucket_table

    raw = {
        "model": {"pretrained": "unused"},
        "data": {"ds": {"batch_size": 4, "bucket": {"type": "ratio", "from": "images", "num_buckets": 8, "max_ratio": 3.0},
                        "sources": [{"type": "image_folder", "img_root": str(root), "prompt_template": "a photo"}]}},
    }
    pipeline = build_pipeline(raw)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prepared = prepare_dataset("ds", pipeline.data["ds"], registry=pipeline.registry, base_dir=".", seed=0)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "images": len(prepared.records),
        "problems": len(prepared.problems),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(rss_after / 1024, 1),
        "rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        "table": bucket_table(prepared),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated image counts")
    parser.add_argument("--workdir", default=None, help="where the generated folders go (default: a temp dir)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, Path(args.workdir))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = []
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--workdir", str(workdir)],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'images':>8} {'seconds':>8} {'img/s':>8} {'RSS growth MB':>14} {'bytes/image':>12}")
    for r in results:
        per_image = r["rss_growth_mb"] * 1024 * 1024 / max(1, r["images"])
        print(f"{r['images']:>8} {r['seconds']:>8} {r['images'] / max(r['seconds'], 1e-9):>8.0f} {r['rss_growth_mb']:>14} {per_image:>12.0f}")
    print()
    print(results[-1]["table"])
    largest = results[-1]
    if largest["images"] >= 100_000:
        verdict = "PASS" if largest["seconds"] < 30 else "FAIL"
        print(f"\n{verdict}: {largest['images']} images bucketed in {largest['seconds']} s (target < 30 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
