"""Attention masks: the brightness table, alignment with the image's crop, latent reduction."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hcp_core.data.geometry import cover_crop
from hcp_core.data.masks import brightness_to_weight, weight_map
from hcp_core.interfaces import CropPlan


def test_table_is_exact_at_the_five_points():
    points = {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 0.75: 3.0, 1.0: 5.0}
    for b, w in points.items():
        assert brightness_to_weight(b) == w
    arr = brightness_to_weight(np.array(list(points)))
    assert arr.tolist() == list(points.values())


def test_table_is_linear_between_points_and_clamped():
    assert brightness_to_weight(0.125) == pytest.approx(0.25)
    assert brightness_to_weight(0.625) == pytest.approx(2.0)
    assert brightness_to_weight(0.875) == pytest.approx(4.0)
    assert brightness_to_weight(-1.0) == 0.0 and brightness_to_weight(2.0) == 5.0


@pytest.mark.parametrize("value, weight", [(0, 0.0), (64, 0.5), (128, 1.0), (191, 3.0), (255, 5.0)])
def test_mask_files_give_table_weights(tmp_path, value, weight):
    path = tmp_path / "m.png"
    Image.new("L", (32, 16), value).save(path)
    plan = CropPlan(resize=(32, 16), box=(0, 0, 32, 16))
    out = weight_map(str(path), (32, 16), plan, latent_factor=8)
    assert out.shape == (2, 4)
    # 8-bit files cannot hold 25% exactly (64/255 = 0.251): the weight is the table at v/255.
    assert np.allclose(out, brightness_to_weight(value / 255)) and abs(float(out[0, 0]) - weight) < 0.03


def test_mask_follows_the_crop_and_averages_latent_cells(tmp_path):
    rng = np.random.default_rng(0)
    bright = rng.integers(0, 256, size=(40, 64), dtype=np.uint8)
    Image.fromarray(bright, "L").save(tmp_path / "m.png")
    # No scaling, crop offset (8, 4): the map must be the 8x8 means of the cropped weights.
    plan = CropPlan(resize=(64, 40), box=(8, 4, 56, 36))
    got = weight_map(str(tmp_path / "m.png"), (64, 40), plan, latent_factor=8)
    weights = np.interp(bright / 255.0, [0, 0.25, 0.5, 0.75, 1], [0, 0.5, 1, 3, 5])[4:36, 8:56]
    expected = weights.reshape(4, 8, 6, 8).mean(axis=(1, 3))
    assert got.shape == (4, 6)
    assert np.allclose(got, expected, atol=1e-4)


def test_mask_gets_the_image_resize_and_a_smaller_mask_is_stretched(tmp_path):
    # Image 128x64; the left half of the mask is black (weight 0), the right white (weight 5).
    full = np.zeros((64, 128), dtype=np.uint8)
    full[:, 64:] = 255
    Image.fromarray(full).save(tmp_path / "full.png")
    Image.fromarray(full[::2, ::2]).save(tmp_path / "half.png")  # same picture at half size
    plan = cover_crop((128, 64), (64, 64), None)  # already covers: centre 64x64 crop
    assert plan == CropPlan(resize=(128, 64), box=(32, 0, 96, 64))
    for name in ("full.png", "half.png"):
        got = weight_map(str(tmp_path / name), (128, 64), plan, latent_factor=8)
        assert got.shape == (8, 8)
        assert np.allclose(got[:, :3], 0.0) and np.allclose(got[:, 5:], 5.0)
        assert np.allclose(got[:, 3], 0.0, atol=0.2) and np.allclose(got[:, 4], 5.0, atol=0.2)
