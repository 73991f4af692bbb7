"""``[validation]``: a held-out split that never trains, a validation loss with fixed noise and
timesteps (the same curve for the same seed, another for other data), per-dataset training losses."""
from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import pytest
from PIL import Image, ImageOps

import hcp_core
from hcp_core.data.holdout import split_records
from hcp_core.errors import ConfigError, DataError
from hcp_core.interfaces import ImageRecord
from hcp_core.train.loop import train
from hcp_core.train.setup import build_run
from hcp_core.train.validation import Validation, prepare_validation
from train_support import pipeline_toml, write_pipeline

# A second dataset (loss_weight 0.5) and 3 of data.ds's 12 images held out for validation.
EXTRA = """
[data.reg]
batch_size = 3
loss_weight = 0.5
bucket = { type = "fixed", target_size = [64, 64] }

[[data.reg.sources]]
type = "image_folder"
img_root = "DATA"
prompt_template = "a photo"

[validation]
every = 1

[validation.split.ds]
count = 3
"""


class ScalarWriter:
    """Stands in for the run's tracker: keeps every ``add_scalar`` as ``{tag: {step: value}}``."""

    def __init__(self) -> None:
        self.scalars: dict = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, {})[step] = float(value)

    def close(self) -> None:
        pass


def _config(tmp: Path, model: Path, data: Path, name: str) -> Path:
    text = pipeline_toml(model, data, tmp / name, max_steps=2, extra=EXTRA.replace("DATA", str(data)))
    return write_pipeline(tmp, text, f"{name}.toml")


def _train(cfg: Path):
    """Train in-process with a :class:`ScalarWriter`; returns the run and the images data.ds trained on."""
    run = attrs.evolve(build_run(hcp_core.load_config(cfg)), writer=ScalarWriter())
    seen: list = []
    draw = run.data.next_batches

    def spy():
        batches = draw()
        seen.extend(batches["ds"]["images"])
        return batches

    run.data.next_batches = spy
    try:
        train(run)
    finally:
        run.close()
    return run, seen


def test_validation_curve_is_fixed_by_the_seed_follows_the_data_and_never_trains(tmp_path, demo_model_dir,
                                                                                   demo_data_dir) -> None:
    first, seen = _train(_config(tmp_path, demo_model_dir, demo_data_dir, "a"))
    second, _ = _train(_config(tmp_path, demo_model_dir, demo_data_dir, "b"))
    curve = dict(first.writer.scalars["val_loss/ds"])  # evaluations below log into the same writer
    assert sorted(curve) == [1, 2] and curve[1] != curve[2]  # evaluated each step; the weights moved
    assert second.writer.scalars["val_loss/ds"] == curve  # same seed: the very same curve

    # The held-out images: 3 of the 12, the same in both runs, never in data.ds's training side.
    held = {r.image for r in first.validation.sets[0].dataset.records}
    trained = {r.image for r in first.data.prepared["ds"].records}
    assert len(held) == 3 and held == {r.image for r in second.validation.sets[0].dataset.records}
    assert not held & trained and len(held | trained) == 12
    assert seen and not held & set(seen)
    log = (tmp_path / "a" / "train.log").read_text()
    assert f"validation at step 2: val_loss/ds {curve[2]:.5f}" in log

    # Per-dataset training losses, and the total is their loss_weight-ed sum.
    s = first.writer.scalars
    for step in (1, 2):
        assert s["loss"][step] == pytest.approx(s["loss/ds"][step] + 0.5 * s["loss/reg"][step], rel=1e-6)

    # Same weights, same data: the same value again (fixed noise, eval mode restored afterwards).
    unet = first.models.unet
    assert unet.training and first.validation.evaluate(first, 2)["ds"] == curve[2] and unet.training
    # Other data (one held-out image changed), same weights: another value.
    changed = tmp_path / "changed"
    shutil.copytree(demo_data_dir, changed)
    image = Path(sorted(held)[0]).name
    with Image.open(changed / image) as im:
        ImageOps.invert(im.convert("RGB")).save(changed / image)
    other = hcp_core.load_config(_config(tmp_path, demo_model_dir, changed, "c"))
    moved = Validation.build(other, prepare_validation(other)).evaluate(first, 2)["ds"]
    assert moved != curve[2]


def _records(n: int) -> list:
    return [ImageRecord(image=f"/data/img{i:02d}.png", size=(64, 64), repeat=3) for i in range(n)]


def test_split_is_a_function_of_seed_and_file_names() -> None:
    records = _records(10)
    train_side, held = split_records(records, seed=1, dataset="ds", fraction=0.25)
    assert len(held) == 2 and len(train_side) == 8  # round(0.25 * 10) = 2 (at least 1)
    assert all(r.repeat == 1 for r in held) and all(r.repeat == 3 for r in train_side)
    # Listing order does not matter; the data folder moving does not matter either.
    moved = [attrs.evolve(r, image=r.image.replace("/data/", "/mnt/other/")) for r in reversed(records)]
    assert sorted(r.image.rsplit("/", 1)[1] for r in split_records(moved, seed=1, dataset="ds", fraction=0.25)[1]) == \
        sorted(r.image.rsplit("/", 1)[1] for r in held)
    others = [split_records(records, seed=s, dataset="ds", count=2)[1] for s in range(2, 6)]
    assert any({r.image for r in o} != {r.image for r in held} for o in others)  # the seed picks them
    with pytest.raises(DataError, match=r"validation\.split\.ds: holds out 10 of the 10 images of data\.ds"):
        split_records(records, seed=1, dataset="ds", count=10)


@pytest.mark.parametrize("validation, message", [
    ({"split": {"ds": {"fraction": 0.1, "count": 2}}}, r"validation\.split\.ds\.count: set exactly one of fraction"),
    ({"split": {"ds": {"fraction": 1.0}}}, r"validation\.split\.ds\.fraction: must be in \(0, 1\), got 1\.0"),
    ({"split": {"dx": {"count": 1}}}, r"validation: split\.dx: no training dataset 'dx'.*datasets: ds"),
    ({"every": 5}, r"validation: no validation data: add \[validation\.split\.<dataset>\]"),
    ({"every": -1, "split": {"ds": {"count": 1}}}, r"validation\.every: must be between 0 and"),
])
def test_validation_config_errors_name_the_key(validation, message) -> None:
    raw = {"model": {"pretrained": "m", "family": "sd"}, "validation": validation,
           "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "."}], "bucket": {"type": "fixed"}}}}
    with pytest.raises(ConfigError, match=message):
        hcp_core.build_pipeline(raw)
