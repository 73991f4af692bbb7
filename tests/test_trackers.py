"""Trackers as a plugin family: a run logs scalars and sample images to every tracker it names
(TensorBoard read back with its EventAccumulator, a third-party tracker through extra_plugins),
the default is TensorBoard when it is installed, and W&B gets its options through accelerate.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import time
from typing import Any, Dict, List, Tuple

import attrs
import numpy as np
import pytest
from PIL import Image

import hcp_core
from hcp_core.config import build_pipeline
from hcp_core.hookspecs import hookimpl
from hcp_core.plugins import build_registry, get_registry
from hcp_core.interfaces import TrackerContext
from hcp_core.train.trackers import chosen_trackers
from train_support import pipeline_toml, write_pipeline


@attrs.define
class RecordingConfig:
    """Keeps every call in memory (a test's tracker)."""

    label: str = "x"


class RecordingTracker:
    """What a third-party tracker plugin looks like; records what it was given."""

    made: List["RecordingTracker"] = []

    def __init__(self, config: RecordingConfig, *, context: TrackerContext) -> None:
        self.config, self.context = config, context
        self.scalars: List[Tuple[str, float, int]] = []
        self.images: List[Tuple[str, np.ndarray, int]] = []
        self.flushed = self.closed = 0
        RecordingTracker.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.images.append((tag, image, step))

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed += 1


class RecordingPlugin:
    @staticmethod
    @hookimpl
    def hcp_register_trackers(registry) -> None:
        registry.add("recording", config=RecordingConfig, factory="test_trackers:RecordingTracker")


SAMPLE = """
[sample]
prompts = ["a red circle"]
every = 0
steps = 2
size = "32x32"
scheduler = "euler_a"
"""


def test_a_run_logs_to_every_chosen_tracker(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    """TensorBoard, a third-party tracker and, when wandb is installed, W&B offline, in one run."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    registry = build_registry(extra_plugins=[RecordingPlugin])
    exp = tmp_path / "run"
    with_wandb = importlib.util.find_spec("wandb") is not None
    wandb = ', { type = "wandb", mode = "offline", project = "hcp-test" }' if with_wandb else ""
    for key, value in (("WANDB_SILENT", "true"), ("WANDB_X_DISABLE_STATS", "true"), ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_X_DISABLE_META", "true"), ("WANDB_CONSOLE", "off"), ("WANDB_DISABLE_CODE", "true")):
        monkeypatch.setenv(key, value)  # quick: no system metrics, machine info, git probing or console capture
    text = pipeline_toml(demo_model_dir, demo_data_dir, exp, max_steps=2, extra=SAMPLE).replace(
        'optimizer = { type = "adamw" }',
        f'optimizer = {{ type = "adamw" }}\ntrackers = [{{ type = "tensorboard", log_dir = "tb" }}, {{ type = "recording", label = "L" }}{wandb}]')
    RecordingTracker.made.clear()
    from hcp_core.data.loader import TrainData

    fetch = TrainData.next_batches

    def slow_fetch(self):  # a loader that keeps each step waiting 0.12 s
        time.sleep(0.12)
        return fetch(self)

    monkeypatch.setattr(TrainData, "next_batches", slow_fetch)
    hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text), registry=registry))

    (mine,) = RecordingTracker.made
    assert mine.config == RecordingConfig(label="L") and mine.closed == 1 and mine.flushed >= 1
    assert mine.context.exp_dir == str(exp) and mine.context.run_name == "run"
    assert mine.context.config["train"]["max_steps"] == 2  # the resolved pipeline, as `hcp config` prints it
    losses = [(step, value) for tag, value, step in mine.scalars if tag == "loss"]
    assert [s for s, _ in losses] == [1, 2] and all(np.isfinite(v) for _, v in losses)
    assert any(tag.startswith("lr/") for tag, _, _ in mine.scalars)
    waits = [(step, value) for tag, value, step in mine.scalars if tag == "time/data_wait"]
    assert [s for s, _ in waits] == [1, 2] and all(0.12 <= v < 60 for _, v in waits)
    ((tag, image, step),) = mine.images
    assert (tag, step, image.shape, image.dtype) == ("samples/0", 2, (32, 32, 3), np.uint8)
    png = np.asarray(Image.open(exp / "samples" / "step-2" / "00.png").convert("RGB"))
    assert np.array_equal(image, png)  # the sample written to disk is the one tracked

    events = EventAccumulator(str(exp / "tb"), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)  # TensorBoard stores float32
    (tb_image,) = events.Images("samples/0")
    assert tb_image.step == 2
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(tb_image.encoded_image_string)).convert("RGB")), png)
    assert not (exp / "logs").exists()  # log_dir moved TensorBoard's files
    if with_wandb:  # the offline run in <exp_dir>/wandb holds the sample image W&B stored
        (stored,) = (exp / "wandb").glob("offline-run-*/files/media/images/samples/0_2_*.png")
        assert np.array_equal(np.asarray(Image.open(stored).convert("RGB")), png)


def _pipeline(trackers: str = "") -> Any:
    raw = {"model": {"pretrained": "m"}, "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "i"}],
                                                          "bucket": {"type": "ratio"}}}}
    if trackers:
        import tomllib

        raw["train"] = tomllib.loads(f"trackers = {trackers}")
    return build_pipeline(raw, get_registry())


def test_tensorboard_is_the_default_when_installed(monkeypatch, caplog) -> None:
    assert [s.name for s in chosen_trackers(_pipeline())] == ["tensorboard"]
    assert chosen_trackers(_pipeline("[]")) == []
    assert [s.name for s in chosen_trackers(_pipeline('["wandb", "tensorboard"]'))] == ["wandb", "tensorboard"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with caplog.at_level(logging.WARNING, logger="hcp"):
        assert chosen_trackers(_pipeline()) == []
    assert "no TensorBoard logs: the tracker 'tensorboard' needs the Python package 'tensorboard', which is not " \
           "installed: pip install tensorboard" in caplog.text


class FakeAccelerateTracker:
    """Stands in for accelerate's WandBTracker: records how hcp starts it and what it logs."""

    requires_logging_directory = False
    calls: List[Tuple[str, Any]] = []

    def __init__(self, run_name: str, **kwargs: Any) -> None:
        FakeAccelerateTracker.calls.append(("init", (run_name, kwargs)))

    def start(self) -> None:
        self.calls.append(("start", None))

    def store_init_configuration(self, values: Dict[str, Any]) -> None:
        self.calls.append(("config", values))

    def log(self, values: Dict[str, Any], step: int) -> None:
        self.calls.append(("log", (values, step)))

    def log_images(self, values: Dict[str, Any], step: int) -> None:
        self.calls.append(("images", (list(values), step)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def test_wandb_options_reach_wandb_init_through_accelerate(monkeypatch, tmp_path) -> None:
    import accelerate.tracking

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeAccelerateTracker)
    spec = _pipeline('[{ type = "wandb", project = "shapes", entity = "me", tags = ["a"], mode = "offline" }]').train.trackers[0]
    FakeAccelerateTracker.calls.clear()
    context = TrackerContext(exp_dir=str(tmp_path), run_name="run7", config={"train": {"max_steps": 3, "betas": [0.9, 0.99]}})
    tracker = spec.build(context=context)
    tracker.add_scalar("loss", 0.5, 1)
    tracker.add_image("samples/0", np.zeros((4, 4, 3), np.uint8), 1)
    tracker.close()
    assert FakeAccelerateTracker.calls == [
        ("init", ("shapes", {"name": "run7", "dir": str(tmp_path), "tags": ["a"], "entity": "me", "mode": "offline"})),
        ("start", None),
        ("config", {"train.max_steps": 3, "train.betas": "[0.9, 0.99]"}),
        ("log", ({"loss": 0.5}, 1)),
        ("images", (["samples/0"], 1)),
        ("finish", None),
    ]
