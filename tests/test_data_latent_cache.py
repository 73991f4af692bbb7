"""The latent cache: computed once, read back exactly, never reused when its inputs change."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image

from hcp_core.config import build_pipeline
from hcp_core.data.latent_cache import vae_fingerprint
from hcp_core.data.loader import build_train_data


@pytest.fixture(scope="module")
def vae():
    from hcp_core.demo.model import tiny_vae

    torch.manual_seed(0)
    return tiny_vae().eval()


def make_data(tmp_path, n=4):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (48 + 16 * (i % 2), 48), (40 * i, 100, 200 - 30 * i)).save(root / f"{i}.png")
    return root


def pipeline(tmp_path, **dataset):
    table = {"batch_size": 2, "cache_latents": True, "bucket": {"type": "fixed", "target_size": [32, 32]},
             "sources": [{"type": "image_folder", "img_root": "imgs", "prompt_template": "x"}], **dataset}
    return build_pipeline({"model": {"pretrained": "unused"}, "exp_dir": "run", "data": {"ds": table}}, base_dir=str(tmp_path))


def cache_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".safetensors"))


class CountingEncode:
    """Counts the images a VAE encodes."""

    def __init__(self, vae):
        self.vae, self.images = vae, 0
        self.original = vae.encode

    def __enter__(self):
        def encode(x, *a, **k):
            self.images += x.shape[0]
            return self.original(x, *a, **k)

        self.vae.encode = encode
        return self

    def __exit__(self, *exc):
        del self.vae.encode


def test_latents_are_cached_under_the_run_and_match_the_vae(tmp_path, vae):
    make_data(tmp_path)
    data = build_train_data(pipeline(tmp_path))
    data.cache_latents(vae)
    files = cache_files(tmp_path / "run" / "latent_cache")
    assert len(files) == 4
    stream = data.streams["ds"]
    batch = data.next_batches()["ds"]
    assert "pixel_values" not in batch and batch["latents"].shape == (2, 4, 4, 4)
    # Independent check: encode the same sample's pixels directly.
    ds = stream.dataset
    record = next(i for i, r in enumerate(ds.records) if r.image == batch["images"][0])
    _, plan = ds.plan(record, None)
    with torch.no_grad():
        dist = vae.encode(ds.load_pixels(record, plan)[None]).latent_dist
    scale = vae.config.scaling_factor
    z = batch["latents"][0] / scale
    # A draw from the cached distribution: within a few std of the mean.
    assert torch.all((z - dist.mean[0]).abs() <= 6 * dist.std[0] + 1e-5)
    assert not torch.allclose(z, dist.mean[0])


def test_second_run_reuses_and_changes_invalidate(tmp_path, vae):
    root = make_data(tmp_path)
    with CountingEncode(vae) as count:
        build_train_data(pipeline(tmp_path)).cache_latents(vae)
    assert count.images == 4
    with CountingEncode(vae) as count:
        build_train_data(pipeline(tmp_path)).cache_latents(vae)
    assert count.images == 0  # all reused
    # A different bucket size means different pixels: new entries.
    with CountingEncode(vae) as count:
        build_train_data(pipeline(tmp_path, bucket={"type": "fixed", "target_size": [48, 32]})).cache_latents(vae)
    assert count.images == 4
    # An edited image is encoded again; the others are reused.
    Image.new("RGB", (48, 48), (1, 2, 3)).save(root / "0.png")
    os.utime(root / "0.png", ns=(1, 1))
    with CountingEncode(vae) as count:
        build_train_data(pipeline(tmp_path)).cache_latents(vae)
    assert count.images == 1
    # Another background colour changes transparent images' pixels: new keys for all.
    with CountingEncode(vae) as count:
        build_train_data(pipeline(tmp_path, background="black")).cache_latents(vae)
    assert count.images == 4


def test_changed_vae_weights_never_reuse_latents(tmp_path, vae):
    make_data(tmp_path)
    build_train_data(pipeline(tmp_path)).cache_latents(vae)
    before = vae_fingerprint(vae)
    import copy

    other = copy.deepcopy(vae)
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    assert vae_fingerprint(other) != before
    with CountingEncode(other) as count:
        build_train_data(pipeline(tmp_path)).cache_latents(other)
    assert count.images == 4
    assert len(os.listdir(tmp_path / "run" / "latent_cache")) == 2  # one folder per VAE


def test_cache_dir_and_random_crop(tmp_path, vae, caplog):
    make_data(tmp_path)
    data = build_train_data(pipeline(tmp_path, cache_dir=str(tmp_path / "elsewhere")))
    data.cache_latents(vae)
    assert len(cache_files(tmp_path / "elsewhere")) == 4
    with caplog.at_level(logging.WARNING, logger="hcp.data"):
        rand = build_train_data(pipeline(tmp_path, bucket={"type": "fixed", "target_size": [32, 32], "crop": "random"}))
    assert "crops at random" in caplog.text
    rand.cache_latents(vae)
    assert "pixel_values" in rand.next_batches()["ds"]
