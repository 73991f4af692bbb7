"""``train.epochs`` / ``save_every_epochs`` (resume included), ``output_name`` file names, and what
each step logs: the learning rate the step used, a ``train.log`` line also under a progress bar."""
from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core.errors import ConfigError
from hcp_core.train.epochs import epoch_plan
from hcp_core.train.loop import train
from hcp_core.train.optim import build_scheduler
from hcp_core.train.progress import Progress
from hcp_core.train.runner import restore
from hcp_core.train.setup import build_run
from test_validation import ScalarWriter
from train_support import pipeline_toml, write_pipeline

# data.ds: 12 images x repeat 2 in one 64x64 bucket, batch 6; data.reg: 12 images, batch 4.
DS_SAMPLES, DS_BATCH, REG_SAMPLES, REG_BATCH, ACCUMULATION = 24, 6, 12, 4, 3


def _pipeline(tmp: Path, model: Path, data: Path, emb: Path, epochs: int) -> Path:
    text = pipeline_toml(model, data, tmp / "exp", max_steps=1, bucket='{ type = "fixed", target_size = [64, 64] }',
                         batch_size=DS_BATCH, extra=f"""
[[unet]]
lr = 1e-3
layers = ['conv_out']

[tokenizer_pt]
emb_dir = "{emb}"
train = [{{ name = "my-cat", lr = 1e-3 }}]

[data.reg]
batch_size = {REG_BATCH}
bucket = {{ type = "fixed", target_size = [64, 64] }}

[[data.reg.sources]]
type = "image_folder"
img_root = "{data}"
prompt_template = "a photo of my-cat"
""")
    text = text.replace("max_steps = 1\n", f"epochs = {epochs}\nsave_every_epochs = 1\nkeep_checkpoints = 9\n"
                        f"gradient_accumulation = {ACCUMULATION}\n")
    text = text.replace('img_root = "', 'repeat = 2\nimg_root = "', 1)  # data.ds only
    text = text.replace("seed = 7\n", 'seed = 7\noutput_name = "mystyle"\n')
    return write_pipeline(tmp, text)


def _expected_steps(epochs: int) -> int:
    """Steps until the dataset with the longest epoch has done ``epochs`` passes."""
    batches = max(math.ceil(DS_SAMPLES / DS_BATCH), math.ceil(REG_SAMPLES / REG_BATCH))
    return math.ceil(epochs * batches / ACCUMULATION)


def test_epochs_end_save_resume_and_name_the_exports(tmp_path, demo_model_dir, demo_data_dir) -> None:
    from hcp_core.tools.create_embedding import create_embedding

    emb = tmp_path / "emb"
    create_embedding(str(demo_model_dir), "my-cat", 2, out=str(emb), seed=1)
    exp = tmp_path / "exp"
    run = attrs.evolve(build_run(hcp_core.load_config(_pipeline(tmp_path, demo_model_dir, demo_data_dir, emb, 2))),
                       writer=ScalarWriter())
    try:
        result = train(run)
    finally:
        run.close()
    two = _expected_steps(2)
    assert result.step == two == 3
    epoch_one = math.ceil(math.ceil(DS_SAMPLES / DS_BATCH) / ACCUMULATION)  # epoch 1 of data.ds ends here
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [f"step-{epoch_one:08d}", f"step-{two:08d}"]
    log = (exp / "train.log").read_text()
    assert f"step {two}/{two} epoch 2/2 loss" in log and f"step 1/{two} epoch 1/2 loss" in log

    # The lr logged for each step is the one the step used, as the schedule gives it.
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = build_scheduler(probe, run.pipeline.train.scheduler, two)  # cosine, 1 warm-up step
    used = []
    for _ in range(two):
        used.append(probe.param_groups[0]["lr"])
        probe.step()
        schedule.step()
    assert used[-1] > 0 and run.optimizer.param_groups[0]["lr"] == 0.0  # the schedule ended after the last step
    logged = [float(x) for x in re.findall(r"step \d+/\d+ epoch \d+/\d+ loss \S+ lr (\S+)", log)]
    assert logged == [float(f"{lr:.3e}") for lr in used]
    assert run.writer.scalars["lr/lora_unet[0]"] == {i + 1: pytest.approx(lr, rel=1e-9) for i, lr in enumerate(used)}
    assert set(run.writer.scalars) >= {"loss/ds", "loss/reg"}

    # Resume with one more epoch: the schedule and the count go on to the new end.
    pipeline = hcp_core.load_config(_pipeline(tmp_path, demo_model_dir, demo_data_dir, emb, 3))
    resumed, start = restore(build_run(pipeline, resume=True), "latest")
    try:
        result = train(resumed, start)
    finally:
        resumed.close()
    three = _expected_steps(3)
    assert start == two and result.step == three == 4
    log = (exp / "train.log").read_text()
    assert "resume: applied the changed value train.epochs: 2 -> 3" in log and f"step {three}/{three} epoch 3/3" in log

    names = {p.name for p in exp.iterdir() if p.suffix == ".safetensors"}
    assert names == {f"mystyle-{s}.safetensors" for s in (epoch_one, two, three)} | {"mystyle.safetensors"} | {
        f"mystyle-finetune-{s}.safetensors" for s in (epoch_one, two, three)} | {"mystyle-finetune.safetensors"}
    assert {p.name for p in (exp / "embeddings").glob("*.*")} == {"mystyle-my-cat.pt", "mystyle-my-cat.safetensors"}
    assert (exp / "embeddings" / f"step-{epoch_one}" / "mystyle-my-cat.safetensors").is_file()
    assert sorted(load_file(str(exp / "mystyle-finetune.safetensors"))) == ["unet.conv_out.bias", "unet.conv_out.weight"]

    # The named LoRA file loads in diffusers: every layer it holds becomes a LoRA layer of the UNet.
    from diffusers import StableDiffusionPipeline

    held = load_file(str(exp / "mystyle.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model_dir))
    pipe.load_lora_weights(str(exp), weight_name="mystyle.safetensors")
    loaded = [n for n, m in pipe.unet.named_modules() if len(getattr(m, "lora_A", {}))]
    assert loaded and len(loaded) == sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in held)


def test_epoch_plan_arithmetic() -> None:
    def cfg(**kw):
        return hcp_core.build_pipeline({"model": {"pretrained": "m", "family": "sd"}, "train": kw, "data": {
            n: {"sources": [{"type": "image_folder", "img_root": "."}], "bucket": {"type": "fixed"}} for n in ("a", "b")
        }}).train

    # 7 batches per epoch of b (the longest), 2 per step: epoch e ends at step ceil(7e / 2).
    plan = epoch_plan(cfg(epochs=3, gradient_accumulation=2), {"a": 5, "b": 7})
    assert (plan.dataset, plan.total_steps) == ("b", 11)
    assert [s for s in range(1, 12) if plan.crosses_multiple(s, 1)] == [4, 7, 11]
    # The step that ends an epoch shows it; the next one the following epoch.
    assert [plan.describe(s) for s in (4, 5, 11)] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert epoch_plan(cfg(epochs=3, epoch_dataset="a"), {"a": 5, "b": 7}).total_steps == 15
    # One step spanning several epochs (accumulation 4 over 1-batch epochs); max_steps runs count epochs too.
    wide = epoch_plan(cfg(max_steps=5, gradient_accumulation=4), {"a": 1, "b": 1})
    assert (wide.total_steps, wide.epochs_done(2), wide.crosses_multiple(2, 3), wide.describe(2)) == (5, 8, True, "epoch 5")
    assert cfg().max_steps == 1000 and cfg(epochs=2).max_steps is None
    with pytest.raises(ConfigError, match=r"train\.epochs: set either train\.max_steps or train\.epochs, not both"):
        cfg(epochs=2, max_steps=10)
    with pytest.raises(ConfigError, match=r"train: epoch_dataset = 'c' is not a dataset.*: a, b"):
        cfg(epochs=2, epoch_dataset="c")
    with pytest.raises(ConfigError, match=r"output_name: 'x/y' is not usable as a file name"):
        hcp_core.build_pipeline({"model": {"pretrained": "m", "family": "sd"}, "output_name": "x/y", "data": {}})


def test_log_file_gets_a_loss_line_every_log_every_steps_under_a_progress_bar(tmp_path, monkeypatch) -> None:
    import sys

    log = logging.getLogger("hcp")
    file_handler, console = logging.FileHandler(tmp_path / "train.log"), logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(log, "handlers", [file_handler, console])
    monkeypatch.setattr(log, "level", logging.INFO)
    progress = Progress(5, 0, 2)
    assert progress.bar is not None
    for step in range(1, 6):
        progress.update(step, 0.5, 1e-4 * step, data_wait=0.01 * step)
    progress.close()
    file_handler.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    # The mean wait of the steps since the previous line: (10+20)/2, (30+40)/2, 50 ms.
    assert [line.split("data wait ")[1].split(" ms/step")[0] for line in lines] == ["15", "35", "50"]
    assert "lr 5.000e-04" in lines[-1] and console.stream.getvalue() == ""  # the bar shows it on the terminal


def test_check_says_what_epochs_come_to_and_reports_the_validation_images(tmp_path, demo_model_dir, demo_data_dir,
                                                                          capsys) -> None:
    from hcp_core import cli
    from hcp_core.tools.create_embedding import create_embedding

    emb = tmp_path / "emb"
    create_embedding(str(demo_model_dir), "my-cat", 2, out=str(emb), seed=1)
    cfg = _pipeline(tmp_path, demo_model_dir, demo_data_dir, emb, 2)
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(f'\n[validation]\n[validation.split.reg]\ncount = 3\n\n[validation.data.extra]\n'
                f'bucket = {{ type = "fixed", target_size = [64, 64] }}\n'
                f'[[validation.data.extra.sources]]\ntype = "image_folder"\nimg_root = "{tmp_path / "missing"}"\n')
    assert cli.main(["check", str(cfg)]) == 2  # the validation dataset's folder does not exist
    out = capsys.readouterr().out
    # data.reg keeps 9 of its 12 images: 3 batches of 4; data.ds 24 samples in 4 batches of 6 is the longest.
    batches = max(math.ceil(DS_SAMPLES / DS_BATCH), math.ceil((REG_SAMPLES - 3) / REG_BATCH))
    assert (f"train: 2 epoch(s) of data.ds ({batches} batches each, gradient_accumulation {ACCUMULATION}) = "
            f"{math.ceil(2 * batches / ACCUMULATION)} optimizer steps") in out
    assert "validation.split.reg: 3 image(s) in 1 bucket(s), 0 problem(s)" in out
    assert re.search(r"validation\.data\.extra: ERROR: .*missing", out), out
