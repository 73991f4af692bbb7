"""Batches: one bucket per batch, per-epoch shuffles from the seed, equal batches per rank, resume."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from hcp_core.config import build_pipeline
from hcp_core.data.loader import build_train_data
from hcp_core.data.sampler import BucketBatchSampler

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]
SIZES = [(96, 64), (64, 96), (80, 80), (128, 64), (64, 64), (100, 70), (70, 100)]


def make_folder(root, n, *, masks=False, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"tag{i}, colour{i % len(COLOURS)}")
        if masks and i % 2 == 0:
            (root / "masks").mkdir(exist_ok=True)
            Image.new("L", size, 255).save(root / "masks" / f"{i:03d}.png")
    return root


def pipeline(tmp_path, datasets, seed=0):
    raw = {"model": {"pretrained": "unused"}, "seed": seed, "exp_dir": str(tmp_path / "run"), "data": datasets}
    return build_pipeline(raw, base_dir=str(tmp_path))


RATIO = {"type": "ratio", "from": "images", "target_area": 64 * 64, "step": 16, "num_buckets": 3}


# ----------------------------------------------------------------------------- sampler
def test_epoch_covers_every_sample_once_in_single_bucket_batches():
    buckets = [list(range(0, 10)), list(range(10, 13)), list(range(13, 30))]
    sampler = BucketBatchSampler(buckets, 4, seed=1)
    batches = sampler.epoch_batches(0)
    which = {i: b for b, members in enumerate(buckets) for i in members}
    assert all(len(set(which[i] for i in batch)) == 1 and len(batch) == 4 for batch in batches)
    counts = Counter(i for batch in batches for i in batch)
    assert set(counts) == set(range(30))
    # Padding repeats samples of the same bucket only: 10 -> 12, 3 -> 4, 17 -> 20.
    assert sum(counts.values()) == 36 and len(batches) == len(sampler) == 9


def test_order_depends_on_seed_and_epoch_only():
    buckets = [list(range(20)), list(range(20, 40))]
    a = BucketBatchSampler(buckets, 5, seed=3, name="ds")
    b = BucketBatchSampler(buckets, 5, seed=3, name="ds")
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != BucketBatchSampler(buckets, 5, seed=4, name="ds").epoch_batches(0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_gets_the_same_number_of_batches(world_size):
    buckets = [list(range(7)), list(range(7, 10)), list(range(10, 23))]
    ranks = [BucketBatchSampler(buckets, 2, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    lengths = {len(list(s)) for s in ranks}
    assert lengths == {len(ranks[0])}
    global_batches = ranks[0].epoch_batches(0)
    per_rank = [s.rank_batches(0) for s in ranks]
    # Step k's rank slices together are global batch k, which equals one process's batch k at
    # batch_size x world_size: N processes train on what one bigger process would.
    assert [sum((r[k] for r in per_rank), []) for k in range(len(global_batches))] == global_batches
    assert global_batches == BucketBatchSampler(buckets, 2 * world_size, seed=0).epoch_batches(0)


def test_bucket_smaller_than_batch_size_repeats_its_images():
    sampler = BucketBatchSampler([[0, 1], [2, 3, 4, 5, 6]], 4, seed=0)
    batches = sampler.epoch_batches(0)
    small = [b for b in batches if set(b) <= {0, 1}]
    assert len(small) == 1 and sorted(small[0]) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- dataset and batches
def test_batches_have_one_bucket_size_and_the_right_pixels(tmp_path):
    make_folder(tmp_path / "a", 14)
    data = build_train_data(pipeline(tmp_path, {"ds": {"batch_size": 3, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]}}))
    stream = data.streams["ds"]
    seen = Counter()
    for _ in range(stream.batches_per_epoch):
        batch = data.next_batches()["ds"]
        px = batch["pixel_values"]
        b, c, h, w = px.shape
        assert b == 3 and c == 3 and h % 16 == 0 and w % 16 == 0 and abs(h * w - 4096) / 4096 < 0.2
        assert (batch["target_size_hw"] == torch.tensor([h, w])).all()
        assert px.min() >= -1 and px.max() <= 1
        assert batch["weight_map"] is None and batch["epoch"] == 0 and batch["loss_weight"] == 1.0
        for i, path in enumerate(batch["images"]):
            # Each image is one flat colour, so every pixel must be that colour in [-1, 1].
            colour = Image.open(path).getpixel((0, 0))
            want = torch.tensor(colour, dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1)
            assert torch.allclose(px[i], want.expand(3, h, w), atol=1e-5)
            n = int(path.rsplit("/", 1)[1][:3])
            assert batch["prompts"][i] == f"tag{n}, colour{n % len(COLOURS)}"
            ow, oh = SIZES[n % len(SIZES)]
            assert batch["original_size_hw"][i].tolist() == [oh, ow]
            seen[path] += 1
    assert len(seen) == 14  # one epoch saw every image
    assert data.next_batches()["ds"]["epoch"] == 1


def test_masks_travel_with_the_batch(tmp_path):
    make_folder(tmp_path / "m", 6, masks=True)
    data = build_train_data(pipeline(tmp_path, {"ds": {"batch_size": 6, "bucket": {"type": "fixed", "target_size": [64, 64]},
                                                     "sources": [{"type": "image_folder", "img_root": "m", "att_mask": "m/masks"}]}}))
    batch = data.next_batches()["ds"]
    wm = batch["weight_map"]
    assert wm.shape == (6, 1, 8, 8)
    for i, path in enumerate(batch["images"]):
        n = int(path.rsplit("/", 1)[1][:3])
        assert torch.allclose(wm[i], torch.full((1, 8, 8), 5.0 if n % 2 == 0 else 1.0))


def test_parallel_datasets_each_step_with_their_loss_weights(tmp_path):
    make_folder(tmp_path / "a", 5)
    make_folder(tmp_path / "b", 9, seed=1)
    data = build_train_data(pipeline(tmp_path, {
        "main": {"batch_size": 2, "loss_weight": 1.0, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]},
        "reg": {"batch_size": 1, "loss_weight": 0.3, "bucket": {"type": "fixed", "target_size": [32, 32]},
                "sources": [{"type": "image_folder", "img_root": "b", "prompt_template": "a photo"}]},
    }))
    assert data.loss_weights == {"main": 1.0, "reg": 0.3}
    epochs = Counter()
    for _ in range(12):
        batches = data.next_batches()
        assert list(batches) == ["main", "reg"]
        assert batches["reg"]["pixel_values"].shape == (1, 3, 32, 32) and batches["reg"]["loss_weight"] == 0.3
        assert batches["reg"]["prompts"] == ["a photo"]
        epochs[(batches["main"]["epoch"], batches["reg"]["epoch"])] += 1
    # Each dataset runs its own epochs: "main" has fewer batches per epoch than "reg".
    assert data.streams["main"].epoch > data.streams["reg"].epoch


def test_resume_restores_the_exact_data_order(tmp_path):
    make_folder(tmp_path / "a", 11)
    p = pipeline(tmp_path, {"ds": {"batch_size": 2, "bucket": {**RATIO, "crop": "random"},
                                   "sources": [{"type": "image_folder", "img_root": "a", "text_transforms": [{"type": "tag_shuffle"}]}]}}, seed=7)
    first = build_train_data(p)
    for _ in range(9):  # into the second epoch
        first.next_batches()
    state = first.state_dict()
    expected = [first.next_batches()["ds"] for _ in range(5)]
    resumed = build_train_data(p)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batches()["ds"]
        assert got["images"] == want["images"] and got["prompts"] == want["prompts"] and got["epoch"] == want["epoch"]
        assert torch.equal(got["crop_top_left"], want["crop_top_left"]) and torch.equal(got["pixel_values"], want["pixel_values"])


def test_worker_processes_give_the_same_batches(tmp_path):
    make_folder(tmp_path / "a", 6)
    ds = {"batch_size": 2, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]}
    inline = build_train_data(pipeline(tmp_path, {"ds": ds}))
    workers = build_train_data(pipeline(tmp_path, {"ds": {**ds, "num_workers": 1}}))
    for _ in range(4):
        a, b = inline.next_batches()["ds"], workers.next_batches()["ds"]
        assert a["images"] == b["images"] and torch.equal(a["pixel_values"], b["pixel_values"])
    workers.close()


def test_a_file_that_breaks_mid_run_is_replaced_not_fatal(tmp_path, caplog):
    root = make_folder(tmp_path / "a", 8)
    data_bytes = (root / "003.png").read_bytes()
    (root / "003.png").write_bytes(data_bytes[: len(data_bytes) // 2])  # header intact, pixels cut
    data = build_train_data(pipeline(tmp_path, {"ds": {"batch_size": 2, "bucket": {"type": "fixed", "target_size": [32, 32]},
                                                     "sources": [{"type": "image_folder", "img_root": "a"}]}}))
    with caplog.at_level(logging.WARNING, logger="hcp.data"):
        images = [p for _ in range(8) for p in data.next_batches()["ds"]["images"]]
    assert not any(p.endswith("003.png") for p in images) and len(images) == 16
    assert "003.png" in caplog.text and "skipping" in caplog.text


def test_batch_size_larger_than_the_data_repeats_images(tmp_path):
    make_folder(tmp_path / "a", 3)
    data = build_train_data(pipeline(tmp_path, {"ds": {"batch_size": 5, "bucket": {"type": "fixed", "target_size": [32, 32]},
                                                     "sources": [{"type": "image_folder", "img_root": "a"}]}}))
    batch = data.next_batches()["ds"]
    assert batch["pixel_values"].shape[0] == 5 and len(set(batch["images"])) == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loading_never_draws_from_the_global_rngs(tmp_path, num_workers):
    """Dropout uses the global torch RNG: building iterators (at step 0, each epoch, on resume)
    must leave it alone, or a resumed run draws other masks than the uninterrupted one."""
    import random

    import numpy as np

    make_folder(tmp_path / "a", 5)
    p = pipeline(tmp_path, {"ds": {"batch_size": 2, "num_workers": num_workers, "bucket": {**RATIO, "crop": "random"},
                                   "sources": [{"type": "image_folder", "img_root": "a", "text_transforms": [{"type": "tag_shuffle"}]}]}})
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    data = build_train_data(p)
    for _ in range(7):  # three epochs: a new iterator for each
        data.next_batches()
    resumed = build_train_data(p)
    resumed.load_state_dict(data.state_dict())
    resumed.next_batches()
    data.close(), resumed.close()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_worker_seeds_are_keyed_on_seed_dataset_and_the_starting_epoch(tmp_path):
    from hcp_core.data.loader import loader_seed

    make_folder(tmp_path / "a", 4)
    p = pipeline(tmp_path, {"ds": {"batch_size": 2, "num_workers": 1, "bucket": RATIO,
                                   "sources": [{"type": "image_folder", "img_root": "a"}]}}, seed=3)
    data = build_train_data(p)
    stream = data.streams["ds"]
    data.next_batches()
    assert stream._generator.initial_seed() == loader_seed(3, "ds", 0)
    resumed = build_train_data(p)
    for _ in range(stream.batches_per_epoch):
        data.next_batches()
    resumed.load_state_dict(data.state_dict())  # a run resumed in epoch 1 starts its iterator there
    resumed.next_batches()
    assert resumed.streams["ds"]._generator.initial_seed() == loader_seed(3, "ds", 1)
    assert len({loader_seed(3, "ds", 0), loader_seed(3, "ds", 1), loader_seed(4, "ds", 0), loader_seed(3, "reg", 0)}) == 4
    data.close(), resumed.close()


def test_one_loader_iterator_crosses_epochs_in_the_sampler_order(tmp_path):
    """Workers prefetch across epoch boundaries: the iterator made at the first batch serves the
    following epochs, each in its own shuffled order, and positions roll over at each epoch's end."""
    make_folder(tmp_path / "a", 6)
    data = build_train_data(pipeline(tmp_path, {"ds": {"batch_size": 2, "num_workers": 1, "bucket": RATIO,
                                                       "sources": [{"type": "image_folder", "img_root": "a"}]}}, seed=5))
    stream = data.streams["ds"]
    per_epoch = stream.batches_per_epoch
    expected = [(e, [i for i in b]) for e in range(3) for b in stream.sampler.rank_batches(e)]
    got, iterators = [], set()
    for _ in range(3 * per_epoch):
        batch = data.next_batches()["ds"]
        iterators.add(id(stream._iter))
        got.append((batch["epoch"], [int(i) for i in batch["indices"]]))
    assert got == expected
    assert len(iterators) == 1
    assert stream.state_dict()["epoch"] == 3 and stream.state_dict()["batch"] == 0
    data.close()


def test_a_position_saved_at_an_epochs_end_continues_with_the_next_epoch(tmp_path):
    make_folder(tmp_path / "a", 4)
    p = pipeline(tmp_path, {"ds": {"batch_size": 2, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]}})
    data = build_train_data(p)
    stream = data.streams["ds"]
    state = dict(stream.state_dict(), epoch=2, batch=stream.batches_per_epoch)  # how earlier versions saved it
    data.load_state_dict({"ds": state})
    batch = data.next_batches()["ds"]
    assert batch["epoch"] == 3
    assert [int(i) for i in batch["indices"]] == stream.sampler.rank_batches(3)[0]
    data.close()


def test_auto_workers_load_in_parallel_on_a_gpu_and_in_process_on_a_cpu(tmp_path, caplog):
    from hcp_core.data.loader import AUTO_MAX_WORKERS, auto_num_workers

    assert auto_num_workers(cuda=False, datasets=1, cpus=64) == 0
    assert auto_num_workers(cuda=True, datasets=1, cpus=64) == AUTO_MAX_WORKERS == 4
    assert auto_num_workers(cuda=True, datasets=1, cpus=3) == 2  # one core stays with the training process
    assert auto_num_workers(cuda=True, datasets=2, cpus=6) == 2  # 5 spare cores over two datasets
    assert auto_num_workers(cuda=True, datasets=1, processes=8, cpus=16) == 1  # 2 cores per process
    assert auto_num_workers(cuda=True, datasets=3, cpus=2) == 1  # never 0 on a GPU

    make_folder(tmp_path / "a", 4)
    ds = {"batch_size": 2, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]}
    p = pipeline(tmp_path, {"ds": ds, "fixed": {**ds, "num_workers": 1}})
    assert p.data["ds"].num_workers == "auto"  # the default
    with caplog.at_level(logging.INFO, logger="hcp.data"):
        on_cpu = build_train_data(p)
        on_gpu = build_train_data(p, cuda=True)
    assert {n: s.num_workers for n, s in on_cpu.streams.items()} == {"ds": 0, "fixed": 1}
    assert {n: s.num_workers for n, s in on_gpu.streams.items()} == {"ds": auto_num_workers(True, 1), "fixed": 1}
    said = [r.getMessage() for r in caplog.records if "num_workers auto" in r.getMessage()]
    assert said == ["num_workers auto: 0 DataLoader worker(s) for data.ds (a CPU device: the step uses every core)",
                    f"num_workers auto: {auto_num_workers(True, 1)} DataLoader worker(s) for data.ds "
                    "(a CUDA device: decoding overlaps the step)"]
    on_cpu.close(), on_gpu.close()


def test_more_workers_than_cpus_are_capped_with_one_warning(tmp_path, caplog):
    import os

    make_folder(tmp_path / "a", 4)
    cpus = os.cpu_count() or 1
    ds = {"batch_size": 2, "bucket": RATIO, "sources": [{"type": "image_folder", "img_root": "a"}]}
    p = pipeline(tmp_path, {"ds": {**ds, "num_workers": cpus + 7}, "reg": {**ds, "num_workers": 1000}, "ok": {**ds, "num_workers": 0}})
    with caplog.at_level(logging.WARNING, logger="hcp.data"):
        data = build_train_data(p)
    assert {name: s.num_workers for name, s in data.streams.items()} == {"ds": cpus, "reg": cpus, "ok": 0}
    capped = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert len(capped) == 1 and f"data.ds ({cpus + 7})" in capped[0] and "data.reg (1000)" in capped[0]
    assert f"using {cpus}" in capped[0]
