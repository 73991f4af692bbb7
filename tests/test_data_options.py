"""Data options: caption dropout, horizontal flip (with masks and the latent cache), bucket
no_upscale and side bounds, and the warnings on buckets far above the model or the images."""
from __future__ import annotations

import io
import logging
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from hcp_core.config import build_pipeline
from hcp_core.data.dataset import sample_rng
from hcp_core.data.loader import build_train_data
from hcp_core.data.prompts import build_prompt
from hcp_core.data.report import check_data
from hcp_core.errors import ConfigError, DataError
from hcp_core.interfaces import BucketContext

#: Wide images with a left/right asymmetry, so a mirror image differs from the original.
SIZES = [(96, 64), (80, 64), (64, 96), (112, 64)]


def make_folder(root, n=4, *, masks=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        ramp = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))  # brighter to the right
        Image.fromarray(np.stack([ramp, 255 - ramp, np.full_like(ramp, 20 * i)], -1).astype(np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"tag{i}, blue, ramp")
        if masks:
            Image.fromarray(ramp.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def pipeline(tmp_path, seed=3, **dataset):
    table = {"batch_size": 2, "bucket": {"type": "fixed", "target_size": [48, 48], "crop": "random"},
             "sources": [{"type": "image_folder", "img_root": "imgs", "att_mask": "imgs/masks",
                          "prompt_template": "a photo, {caption}"}]}
    table.update(dataset)
    return build_pipeline({"model": {"pretrained": "unused"}, "seed": seed, "exp_dir": "run", "data": {"ds": table}},
                          base_dir=str(tmp_path))


# ----------------------------------------------------------------------------- caption dropout
def test_caption_dropout_empties_the_whole_prompt_at_its_rate_and_repeats(tmp_path):
    make_folder(tmp_path / "imgs", n=1)
    sources = [{"type": "image_folder", "img_root": "imgs", "prompt_template": "a photo of sks, {caption}",
                "text_transforms": [{"type": "caption_dropout", "p": 0.3}, {"type": "tag_shuffle"}]}]
    data = build_train_data(pipeline(tmp_path, sources=sources))
    record = data.streams["ds"].dataset.records[0]
    n = 4000
    prompts = [build_prompt(record, sample_rng(3, "ds", i // 100, i % 100)) for i in range(n)]
    dropped = sum(p == "" for p in prompts)
    # Binomial(4000, 0.3): 4 standard deviations either side.
    assert abs(dropped / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    kept = [p for p in prompts if p]
    assert all(p.startswith("a photo of sks, ") for p in kept)  # the template goes only with the caption
    assert len(set(kept)) > 1  # the shuffle after it still runs
    # Keyed on (seed, dataset, epoch, sample): the same draws again, other ones with another seed.
    assert prompts == [build_prompt(record, sample_rng(3, "ds", i // 100, i % 100)) for i in range(n)]
    other = [build_prompt(record, sample_rng(4, "ds", i // 100, i % 100)) == "" for i in range(n)]
    assert other != [p == "" for p in prompts]


def test_caption_dropout_is_refused_by_the_text_cache(tmp_path):
    from hcp_core.train.text_cache import fixed_prompts

    make_folder(tmp_path / "imgs", n=1)
    sources = [{"type": "image_folder", "img_root": "imgs", "text_transforms": [{"type": "caption_dropout"}]}]
    data = build_train_data(pipeline(tmp_path, sources=sources))
    with pytest.raises(ConfigError, match="model.cache_text: the prompts of data.ds change"):
        fixed_prompts(data.prepared)


def test_caption_dropout_p_is_range_checked(tmp_path):
    sources = [{"type": "image_folder", "img_root": "imgs", "text_transforms": [{"type": "caption_dropout", "p": 1.5}]}]
    with pytest.raises(Exception, match=r"p.*between 0 and 1.*1\.5"):
        pipeline(tmp_path, sources=sources)


# ----------------------------------------------------------------------------- flip
def samples(data, epoch=0):
    ds = data.streams["ds"].dataset
    return [ds[(i, epoch)] for i in range(len(ds))]


def test_flip_mirrors_pixels_and_mask_together_and_keeps_the_crop(tmp_path):
    make_folder(tmp_path / "imgs")
    plain = samples(build_train_data(pipeline(tmp_path)))
    flipped = samples(build_train_data(pipeline(tmp_path, flip=1.0)))
    for a, b in zip(plain, flipped):
        assert not a["flipped"] and b["flipped"]
        assert not torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))
        assert a["weight_map"].abs().sum() > 0 and torch.equal(b["weight_map"], a["weight_map"].flip(-1))
        # The same random crop; its left edge measured in the mirrored image.
        (top, left), (w, h) = a["crop_top_left"], Image.open(a["image"]).size
        resize_w = round(w * max(48 / w, 48 / h))
        assert b["crop_top_left"] == (top, resize_w - left - 48)
        assert b["prompt"] == a["prompt"]
    # Independently of the loader: the sample's mask, mirrored, cropped the same way, averaged per cell.
    from hcp_core.data.masks import brightness_to_weight

    s = flipped[0]
    mask = Image.open(tmp_path / "imgs" / "masks" / os.path.basename(s["image"])).convert("L")
    w, h = mask.size
    scale = max(48 / w, 48 / h)
    resized = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    top, left = s["crop_top_left"]
    cells = brightness_to_weight(np.asarray(resized.crop((left, top, left + 48, top + 48)), dtype=np.float32) / 255)
    expected = torch.from_numpy(cells.reshape(6, 8, 6, 8).mean(axis=(1, 3)))
    assert torch.allclose(s["weight_map"][0], expected, atol=0.15)  # bilinear edge rounding only


def test_flip_probability_is_deterministic_per_seed_epoch_and_sample(tmp_path):
    from hcp_core.data.dataset import flip_drawn

    draws = [flip_drawn(0.5, 7, "ds", e, i) for e in range(20) for i in range(100)]
    assert abs(sum(draws) / len(draws) - 0.5) < 4 * math.sqrt(0.25 / len(draws))
    assert draws == [flip_drawn(0.5, 7, "ds", e, i) for e in range(20) for i in range(100)]
    assert draws != [flip_drawn(0.5, 8, "ds", e, i) for e in range(20) for i in range(100)]
    assert not any(flip_drawn(0.0, 7, "ds", 0, i) for i in range(100))


def test_flip_must_be_a_probability(tmp_path):
    with pytest.raises(Exception, match=r"flip.*between 0 and 1.*2"):
        pipeline(tmp_path, flip=2.0)


def test_latent_cache_holds_both_mirrors_and_serves_the_drawn_one(tmp_path):
    from safetensors.torch import load_file

    from hcp_core.data.latent_cache import entry_key
    from hcp_core.demo.model import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    make_folder(tmp_path / "imgs", n=2, masks=False)
    bucket = {"type": "fixed", "target_size": [32, 32]}

    def dataset(flip):
        data = build_train_data(pipeline(tmp_path, flip=flip, cache_latents=True, bucket=bucket))
        data.cache_latents(vae)
        return data.streams["ds"].dataset

    half = dataset(0.5)
    root = tmp_path / "run" / "latent_cache"
    files = {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")}
    assert len(files) == 4  # 2 images x (plain, mirrored)
    always, never = dataset(1.0), dataset(0.0)  # both reuse those entries
    assert {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs} == files
    for index in range(2):
        _, plan = never.plan(index, None)
        pixels = never.load_pixels(index, plan)
        with torch.no_grad():
            plain = vae.encode(pixels[None]).latent_dist
            mirrored = vae.encode(pixels.flip(-1)[None]).latent_dist  # independently: mirrored pixels
        folder = next(iter(os.listdir(root)))
        key = entry_key(never.records[index].image, (32, 32), plan, (255, 255, 255), flipped=True)
        entry = load_file(str(root / folder / key[:2] / f"{key}.safetensors"))
        torch.testing.assert_close(entry["mean"], mirrored.mean[0], rtol=0, atol=1e-5)
        assert not torch.allclose(plain.mean, mirrored.mean, atol=1e-3)
        # The same noise draw either way; each sample reads its own mirror's distribution.
        scale = vae.config.scaling_factor
        a, b = never[(index, 0)], always[(index, 0)]
        torch.testing.assert_close((a["latents"] / scale - plain.mean[0]) / plain.std[0],
                                   (b["latents"] / scale - mirrored.mean[0]) / mirrored.std[0], rtol=0, atol=1e-4)
    assert {half[(i, e)]["flipped"] for i in range(2) for e in range(8)} == {True, False}


def test_resume_gives_the_same_flips_and_dropped_captions(tmp_path):
    make_folder(tmp_path / "imgs", n=4)
    sources = [{"type": "image_folder", "img_root": "imgs", "att_mask": "imgs/masks",
                "text_transforms": [{"type": "caption_dropout", "p": 0.5}]}]

    def stream():
        return build_train_data(pipeline(tmp_path, flip=0.5, sources=sources)).streams["ds"]

    first = stream()
    batches = [next(first) for _ in range(5)]
    state = None
    replay = stream()
    for _ in range(2):
        next(replay)
    state = replay.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    for want in batches[2:]:
        got = next(resumed)
        assert got["prompts"] == want["prompts"] and torch.equal(got["flipped"], want["flipped"])
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and torch.equal(got["weight_map"], want["weight_map"])
    assert any(b["flipped"].any() for b in batches) and any(p == "" for b in batches for p in b["prompts"])


# ----------------------------------------------------------------------------- buckets
def ratio_bucket(**options):
    from hcp_plugins.buckets.config import RatioBucketConfig
    from hcp_plugins.buckets.ratio import RatioBucket

    return RatioBucket(RatioBucketConfig(**options), context=BucketContext())


def fit_assign(bucket, sizes):
    buckets = bucket.fit(sizes)
    return buckets, [buckets[bucket.assign(s, buckets)] for s in sizes]


def test_no_upscale_gives_small_images_a_smaller_bucket_they_cover(tmp_path):
    step = 64
    sizes = [(1024, 1024), (300, 300), (200, 450), (640, 400), (1000, 500), (130, 70)]
    base, base_of = fit_assign(ratio_bucket(target_area=512 * 512, step=step, max_ratio=2.5), sizes)
    buckets, got = fit_assign(ratio_bucket(target_area=512 * 512, step=step, max_ratio=2.5, no_upscale=True), sizes)
    assert buckets[: len(base)] == base
    for size, bucket, big in zip(sizes, got, base_of):
        w, h = size
        # Independently: the ratio bucket scaled by the largest factor <= 1 the image still
        # covers, each side rounded down to the step (exact fractions, no float rounding).
        f = min(Fraction(1), Fraction(w, big[0]), Fraction(h, big[1]))
        expected = (max(step, math.floor(big[0] * f / step) * step), max(step, math.floor(big[1] * f / step) * step))
        assert bucket == expected, size
        if min(w, h) >= step:
            assert bucket[0] <= w and bucket[1] <= h  # never enlarged
    assert got[0] == (512, 512) and got[1] == (256, 256) and got[3] == base_of[3]
    assert got[5] == (64, 64)  # smaller than one step: the step is the floor
    assert set(got) <= set(buckets)


def test_no_upscale_through_prepare_never_enlarges(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, size in enumerate([(96, 64), (40, 40), (200, 120), (24, 56)]):
        Image.new("RGB", size, (i, i, i)).save(root / f"{i}.png")
    bucket = {"type": "ratio", "target_area": 96 * 96, "step": 8, "num_buckets": 3, "no_upscale": True}
    data = build_train_data(pipeline(tmp_path, bucket=bucket, sources=[{"type": "image_folder", "img_root": "imgs"}]))
    prepared = data.prepared["ds"]
    for record, b in zip(prepared.records, prepared.assignment):
        bw, bh = prepared.bucket_sizes[b]
        assert bw <= record.size[0] and bh <= record.size[1], (record.size, (bw, bh))
    for sample in samples(data):
        assert sample["pixel_values"].shape[1:] == tuple(reversed(prepared.bucket_sizes[prepared.assignment[sample["index"]]]))


def test_min_and_max_side_bound_every_bucket():
    sizes = [(w, h) for w in range(200, 1400, 97) for h in range(200, 1400, 131)]
    free, _ = fit_assign(ratio_bucket(target_area=512 * 512, step=64, num_buckets=7, max_ratio=3.0), sizes)
    assert max(max(b) for b in free) > 640 and min(min(b) for b in free) < 384
    bounded, got = fit_assign(ratio_bucket(target_area=512 * 512, step=64, num_buckets=7, max_ratio=3.0,
                                           min_side=384, max_side=640), sizes)
    assert all(384 <= side <= 640 for b in bounded for side in b)
    # Independently: sides are multiples of the step within the bounds.
    allowed = {(w, h) for w in range(384, 641, 64) for h in range(384, 641, 64)}
    assert set(bounded) <= allowed and len(bounded) > 1
    assert set(got) <= set(bounded)
    same, _ = fit_assign(ratio_bucket(target_area=512 * 512, step=64, num_buckets=7, max_ratio=3.0, min_side=8,
                                      max_side=8192), sizes)
    assert same == free


def test_side_bounds_that_leave_no_bucket_or_cross_are_errors(tmp_path):
    make_folder(tmp_path / "imgs")
    bucket = {"type": "ratio", "target_area": 512 * 512, "step": 64, "max_side": 256}
    with pytest.raises(DataError, match=r"data.ds.bucket \(ratio\).*max_side = 256.*target_area"):
        build_train_data(pipeline(tmp_path, bucket=bucket))
    with pytest.raises(Exception, match="min_side 512 is larger than max_side 256"):
        pipeline(tmp_path, bucket={"type": "ratio", "min_side": 512, "max_side": 256})


# ----------------------------------------------------------------------------- size warnings
def test_warnings_for_buckets_far_above_the_model_and_the_images(tmp_path, caplog):
    make_folder(tmp_path / "imgs")  # images of 64 to 112 px
    big = pipeline(tmp_path, bucket={"type": "fixed", "target_size": [512, 512]})
    with caplog.at_level(logging.WARNING, logger="hcp.data"):
        build_train_data(big, native_size=(64, 64))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ("data.ds: buckets up to 512x512 have 64.0x the pixels of the model's native 64x64 (its sample_size "
            "times the latent factor)") in text
    assert "target_area = 4096" in text
    # The median image (96x64, 80x64, 64x96, 112x64) is enlarged by 512 / 64 = 8 per side.
    assert "data.ds: most images are enlarged to fill their buckets (median 8.0x per side" in text
    assert "no_upscale = true" in text
    out = io.StringIO()
    check_data(big, out, native_size=(64, 64), verify_images=False)
    assert out.getvalue().count("warning: data.ds:") == 2
    # Buckets at the native size, near the images' own: silent.
    caplog.clear()
    fine = pipeline(tmp_path, bucket={"type": "fixed", "target_size": [64, 64]})
    with caplog.at_level(logging.WARNING, logger="hcp.data"):
        build_train_data(fine, native_size=(64, 64))
    assert not [r for r in caplog.records if "enlarged" in r.getMessage() or "native" in r.getMessage()]


def test_native_size_comes_from_the_denoiser_config():
    from types import SimpleNamespace

    from hcp_core.data.size_checks import native_size

    assert native_size(SimpleNamespace(unet=SimpleNamespace(config={"sample_size": 8})), 8) == (64, 64)
    assert native_size(SimpleNamespace(unet=None, transformer=SimpleNamespace(config={"sample_size": [64, 96]})), 16) == (1536, 1024)
    assert native_size(SimpleNamespace(unet=None, transformer=SimpleNamespace(config={})), 8) is None


def test_hcp_check_warns_from_the_model_config_and_accepts_emphasis(tmp_path, demo_model_dir, demo_data_dir):
    import hcp_core
    from hcp_core.train.preflight import check_pipeline
    from train_support import pipeline_toml, write_pipeline

    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", bucket='{ type = "fixed", target_size = [256, 256] }')
    out = io.StringIO()
    ok = check_pipeline(hcp_core.load_config(write_pipeline(tmp_path, text), ["model.prompt_emphasis=true"]), out,
                        verify_images=False)
    text = out.getvalue()
    assert ok, text
    # The demo UNet's sample_size 8 times the VAE's factor 8: 64 px native, read without loading weights.
    assert "warning: data.ds: buckets up to 256x256 have 16.0x the pixels of the model's native 64x64" in text
    assert "model: OK" in text
