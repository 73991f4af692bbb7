"""Buckets: fixed and ratio (from ratios, from images), assignment and crop plans."""
from __future__ import annotations

import functools
import itertools
import math
import random
import time

import pytest

from hcp_core.config.convert import make_converter, structure
from hcp_core.config.schema import DatasetConfig
from hcp_core.data.geometry import RatioIndex, cover_crop, log_ratio, nearest_ratio
from hcp_core.errors import ConfigError
from hcp_core.interfaces import BucketContext
from hcp_core.plugins import get_registry
from hcp_plugins.buckets.clustering import kmeans_1d, match_ordered
from hcp_plugins.buckets.config import RatioBucketConfig


def build_bucket(table):
    """A bucket built the way a pipeline builds it: TOML table -> converter -> registry factory."""
    conv = make_converter(get_registry())
    cfg = structure(conv, {"sources": [], "bucket": table}, DatasetConfig)
    return cfg.bucket.build(context=BucketContext(seed=0, dataset="ds"))


def random_sizes(n, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(200, 3000), rng.randint(200, 3000)) for _ in range(n)]


# ----------------------------------------------------------------------------- crop plans
@pytest.mark.parametrize("size", [(1000, 500), (333, 777), (512, 512), (64, 4000), (100, 50)])
@pytest.mark.parametrize("bucket", [(512, 512), (448, 576), (704, 384)])
def test_cover_crop_covers_and_crops_exactly(size, bucket):
    for rng in (None, random.Random(1)):
        plan = cover_crop(size, bucket, rng)
        rw, rh = plan.resize
        left, top, right, bottom = plan.box
        assert (right - left, bottom - top) == bucket
        assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
        # The resize keeps the aspect ratio (to rounding) and one side fits the bucket exactly.
        assert rw == bucket[0] or rh == bucket[1]
        assert abs(rw / rh - size[0] / size[1]) <= (size[0] / size[1]) * (1 / min(rw, rh)) + 1e-9


def test_center_crop_is_centred_and_random_crop_varies():
    plan = cover_crop((1000, 500), (512, 512), None)
    assert plan.resize == (1024, 512) and plan.box == (256, 0, 768, 512)
    lefts = {cover_crop((1000, 500), (512, 512), random.Random(s)).box[0] for s in range(20)}
    assert len(lefts) > 5 and all(0 <= x <= 512 for x in lefts)


# ----------------------------------------------------------------------------- fixed
def test_fixed_bucket():
    bucket = build_bucket({"type": "fixed", "target_size": [320, 192], "crop": "random"})
    assert bucket.fit(random_sizes(10)) == [(320, 192)]
    assert bucket.assign((10, 1000), [(320, 192)]) == 0
    assert not bucket.deterministic
    plans = {bucket.crop((1000, 1000), (320, 192), random.Random(s)).box for s in range(10)}
    assert len(plans) > 1
    centre = build_bucket({"type": "fixed", "target_size": [320, 192]})
    assert centre.deterministic
    assert centre.crop((1000, 1000), (320, 192), random.Random(3)) == cover_crop((1000, 1000), (320, 192), None)


def test_fixed_bucket_rejects_sides_that_latents_cannot_divide():
    with pytest.raises(ConfigError, match=r"bucket.target_size: each side must be a multiple of 8 between 8 and 8192, got \[500, 512\]"):
        build_bucket({"type": "fixed", "target_size": [500, 512]})
    with pytest.raises(ConfigError, match=r"bucket.target_size: each side must be a multiple of 8 between 8 and 8192, got \[8200, 512\]"):
        build_bucket({"type": "fixed", "target_size": [8200, 512]})


# ----------------------------------------------------------------------------- ratio, from ratios
def test_ratio_from_ratios_default():
    bucket = build_bucket({"type": "ratio"})
    sizes = bucket.fit([])
    # Area 512*512, step 64, ratio range [1/2, 2], 5 buckets spread over it.
    assert sizes == [(384, 704), (448, 576), (512, 512), (576, 448), (704, 384)]


@pytest.mark.parametrize("area, step, n, max_ratio", [(262144, 64, 5, 2.0), (1048576, 64, 9, 3.0), (65536, 8, 7, 4.0), (786432, 32, 4, 2.5)])
def test_ratio_from_ratios_properties(area, step, n, max_ratio):
    sizes = build_bucket({"type": "ratio", "target_area": area, "step": step, "num_buckets": n, "max_ratio": max_ratio}).fit([])
    assert len(sizes) == n == len(set(sizes))
    ratios = [log_ratio(s) for s in sizes]
    assert ratios == sorted(ratios)
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert abs(w * h - area) <= step * max(w, h) / 2 + 1e-9  # the nearest area this step allows
        assert 1 / max_ratio - 1e-9 <= w / h <= max_ratio + 1e-9
    # Spread over the range: symmetric around square.
    assert sorted((h, w) for w, h in sizes) == sorted(sizes)


def test_target_size_is_an_area():
    by_size = build_bucket({"type": "ratio", "target_size": [768, 512], "num_buckets": 3}).fit([])
    by_area = build_bucket({"type": "ratio", "target_area": 768 * 512, "num_buckets": 3}).fit([])
    assert by_size == by_area


def test_more_buckets_than_the_step_allows_uses_all_sizes_and_says_so(caplog):
    bucket = build_bucket({"type": "ratio", "target_area": 256 * 256, "step": 64, "num_buckets": 6})
    sizes = bucket.fit([])
    # Widths 192, 256, 320, 384 with the height nearest 65536 px (and the transposes), ratio <= 2.
    assert sizes == [(192, 384), (192, 320), (256, 256), (320, 192), (384, 192)]
    assert "num_buckets = 6, but area 65536 with step 64 and max_ratio 2.0 allows only 5 distinct size(s)" in bucket.notes[0]
    assert "allows only 5 distinct size(s)" in caplog.text


@pytest.mark.parametrize(
    "table, message",
    [
        ({"type": "ratio", "step": 4}, r"bucket.step: must be a multiple of 8 between 8 and 8192, got 4"),
        ({"type": "ratio", "step": 12}, r"bucket.step: must be a multiple of 8 between 8 and 8192, got 12"),
        ({"type": "ratio", "step": 8200}, r"bucket.step: must be a multiple of 8 between 8 and 8192, got 8200"),
        ({"type": "ratio", "from": "pictures"}, r"bucket.from: must be one of 'ratios', 'images', got 'pictures'"),
        ({"type": "ratio", "max_ratio": 0.5}, r"bucket.max_ratio: must be between 1 and 20, got 0.5"),
        ({"type": "ratio", "max_ratio": 1e15}, r"bucket.max_ratio: must be between 1 and 20, got 1000000000000000.0"),
        ({"type": "ratio", "max_ratio": math.inf}, r"bucket.max_ratio: must be a finite number \(between 1 and 20\), got inf"),
        ({"type": "ratio", "max_ratio": math.nan}, r"bucket.max_ratio: must be a finite number \(between 1 and 20\), got nan"),
        ({"type": "ratio", "target_area": 2**62}, r"bucket.target_area: must be between 1 and 67108864, got 4611686018427387904"),
        ({"type": "ratio", "target_area": 0}, r"bucket.target_area: must be between 1 and 67108864, got 0"),
        ({"type": "ratio", "target_size": [16384, 8]}, r"bucket.target_size: each side must be a multiple of 8 between 8 and 8192"),
        ({"type": "ratio", "num_buckets": 200_000_000}, r"bucket.num_buckets: must be between 1 and 256, got 200000000"),
        ({"type": "ratio", "num_buckets": 0}, r"bucket.num_buckets: must be between 1 and 256, got 0"),
        ({"type": "ratio", "num_bucket": 3}, r"bucket.num_bucket: unknown key. Did you mean 'num_buckets'\?"),
        ({"type": "ratio", "crop": "middle"}, r"bucket.crop: must be one of 'center', 'random'"),
        ({"type": "ratio", "target_area": 1000, "target_size": [32, 32]}, r"target_area or target_size, not both"),
        ({"type": "ratoi"}, r"unknown bucket 'ratoi'. Did you mean 'ratio'\?"),
    ],
)
def test_bucket_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_bucket(table)


def test_from_key_round_trips_through_the_converter():
    conv = make_converter(get_registry())
    cfg = structure(conv, {"sources": [], "bucket": {"type": "ratio", "from": "images"}}, DatasetConfig)
    assert isinstance(cfg.bucket.config, RatioBucketConfig) and cfg.bucket.config.build_from == "images"
    assert conv.unstructure(cfg.bucket)["from"] == "images"


# ----------------------------------------------------------------------------- ratio, from images
def brute_force_kmeans(values, k):
    """Least squared error over every split of the sorted distinct values into k runs."""
    xs = sorted(values)
    best = None
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        parts = [xs[a:b] for a, b in zip((0,) + cuts, cuts + (len(xs),))]
        cost = sum(sum((x - sum(p) / len(p)) ** 2 for x in p) for p in parts)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, sorted(sum(p) / len(p) for p in parts))
    return best[1]


def reference_kmeans(values, k):
    """The plain O(k n^2) dynamic program over the sorted values (no speed-up), for larger inputs."""
    xs = sorted(set(values))
    weights = [values.count(x) for x in xs]
    n = len(xs)

    @functools.lru_cache(maxsize=None)
    def cost(a, b):
        pts = [(x, w) for x, w in zip(xs[a:b], weights[a:b])]
        mean = sum(x * w for x, w in pts) / sum(w for _, w in pts)
        return sum(w * (x - mean) ** 2 for x, w in pts)

    best = {(0, 0): (0.0, [])}
    for m in range(1, k + 1):
        for end in range(m, n + 1):
            best[(m, end)] = min(
                ((best[(m - 1, s)][0] + cost(s, end), best[(m - 1, s)][1] + [(s, end)]) for s in range(m - 1, end) if (m - 1, s) in best),
                key=lambda t: t[0],
            )
    _, runs = best[(k, n)]
    return sorted(sum(x * w for x, w in zip(xs[a:b], weights[a:b])) / sum(weights[a:b]) for a, b in runs)


def test_kmeans_1d_matches_the_plain_dynamic_program_on_larger_inputs():
    rng = random.Random(11)
    for _ in range(6):
        values = [round(rng.gauss(rng.choice((-1.0, 0.0, 0.7)), 0.2), 3) for _ in range(80)]
        k = rng.randint(2, 7)
        got, want = kmeans_1d(values, k), reference_kmeans(values, k)
        cost = lambda centres: sum(min((v - c) ** 2 for c in centres) for v in values)  # noqa: E731
        assert cost(got) == pytest.approx(cost(want), rel=1e-9, abs=1e-12)


def test_kmeans_1d_is_the_exact_optimum():
    rng = random.Random(5)
    for _ in range(20):
        values = [round(rng.uniform(-1, 1), 3) for _ in range(9)]
        k = rng.randint(1, 4)
        assert kmeans_1d(values, k) == pytest.approx(brute_force_kmeans(values, k), abs=1e-9)


def test_match_ordered_is_optimal():
    rng = random.Random(2)
    for _ in range(30):
        cands = sorted(rng.uniform(-1, 1) for _ in range(7))
        targets = sorted(rng.uniform(-1, 1) for _ in range(rng.randint(1, 7)))
        got = match_ordered(targets, cands)
        assert got == sorted(set(got))
        best = min(sum(abs(t - cands[j]) for t, j in zip(targets, combo)) for combo in itertools.combinations(range(7), len(targets)))
        assert sum(abs(t - cands[j]) for t, j in zip(targets, got)) == pytest.approx(best)


def test_ratio_from_images_follows_the_data_and_is_deterministic():
    # Three groups: portrait 2:3, square, wide 16:9.
    sizes = [(400, 600)] * 30 + [(512, 512)] * 20 + [(1920, 1080)] * 40 + [(1280, 720)] * 10
    bucket = build_bucket({"type": "ratio", "from": "images", "num_buckets": 3})
    got = bucket.fit(sizes)
    shuffled = list(sizes)
    random.Random(0).shuffle(shuffled)
    assert got == bucket.fit(shuffled) == build_bucket({"type": "ratio", "from": "images", "num_buckets": 3}).fit(sizes)
    assert len(got) == 3
    for (w, h), want in zip(got, (400 / 600, 1.0, 16 / 9)):
        assert abs(math.log((w / h) / want)) < 0.12
        assert w % 64 == 0 and h % 64 == 0 and abs(w * h - 262144) / 262144 < 0.15


def test_ratio_from_images_with_fewer_ratios_than_buckets():
    bucket = build_bucket({"type": "ratio", "from": "images", "num_buckets": 5})
    assert bucket.fit([(300, 300)] * 4) == [(512, 512)]
    assert bucket.notes == ["the images have only 1 distinct aspect ratio(s), so 1 bucket(s)"]


def test_extreme_images_are_clipped_to_max_ratio():
    sizes = [(5000, 500)] * 10 + [(500, 500)] * 10
    got = build_bucket({"type": "ratio", "from": "images", "num_buckets": 2, "max_ratio": 2.0}).fit(sizes)
    assert got == [(512, 512), (704, 384)]


# ----------------------------------------------------------------------------- limits
LARGEST = {"target_area": 8192 * 8192, "step": 8, "max_ratio": 20.0, "num_buckets": 256}


@pytest.mark.parametrize("build_from", ["ratios", "images"])
def test_the_largest_allowed_ratio_config_fits_quickly(build_from):
    # Every allowed range at its extreme: the biggest area, finest step, widest ratio range, most
    # buckets, and 100,000 images of every shape (about 6,000 distinct log ratios to cluster).
    bucket = build_bucket({"type": "ratio", "from": build_from, **LARGEST})
    rng = random.Random(0)
    sizes = [(rng.randint(1, 30000), rng.randint(1, 30000)) for _ in range(100_000)]
    start = time.perf_counter()
    got = bucket.fit(sizes)
    assert time.perf_counter() - start < 20  # about a second; the unbounded versions ran for minutes
    assert len(got) == 256 == len(set(got))
    assert [log_ratio(s) for s in got] == sorted(log_ratio(s) for s in got)
    for w, h in got:
        assert w % 8 == 0 and h % 8 == 0 and 1 / 20 - 1e-9 <= w / h <= 20 + 1e-9
        assert abs(w * h - 8192 * 8192) <= 8 * max(w, h) / 2 + 1e-9


@pytest.mark.parametrize("table", [
    {"type": "ratio", "target_area": 64, "step": 8, "max_ratio": 20.0, "num_buckets": 256},  # smallest area
    {"type": "ratio", "target_size": [8192, 8192], "step": 8192, "max_ratio": 1.0, "num_buckets": 1},
    {"type": "ratio", "target_area": 8192 * 8192, "step": 8192, "max_ratio": 20.0, "num_buckets": 256},
    {"type": "ratio", "from": "images", "target_area": 64, "step": 8, "max_ratio": 1.0, "num_buckets": 256},
    {"type": "fixed", "target_size": [8192, 8192]},
])  # fmt: skip
def test_other_extremes_fit_quickly(table):
    start = time.perf_counter()
    got = build_bucket(table).fit(random_sizes(1000))
    assert time.perf_counter() - start < 5
    assert got and all(w % 8 == 0 and h % 8 == 0 and w <= 8192 * 20 and h <= 8192 * 20 for w, h in got)


def test_match_ordered_takes_the_whole_candidate_list_when_it_must():
    cands = [0.1 * i for i in range(50)]
    assert match_ordered(cands, cands) == list(range(50))
    assert match_ordered([0.0, 0.0, 0.0], cands) == [0, 1, 2]  # ties: the lowest indices


# ----------------------------------------------------------------------------- assignment
def test_assign_is_nearest_log_ratio():
    bucket = build_bucket({"type": "ratio", "num_buckets": 7, "max_ratio": 3.0, "step": 32})
    buckets = bucket.fit([])
    index = RatioIndex(buckets)
    for size in random_sizes(300, seed=3):
        want = min(range(len(buckets)), key=lambda i: (abs(math.log(size[0] / size[1]) - math.log(buckets[i][0] / buckets[i][1])), i))
        assert bucket.assign(size, buckets) == want == nearest_ratio(size, buckets) == index(size)
