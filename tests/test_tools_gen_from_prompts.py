"""``hcp tools gen-from-prompts``: images + captions the image_folder source reads; reruns resume."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hcp_core import cli
from hcp_core.config import build_pipeline
from hcp_core.data.prepare import scan_sources
from hcp_core.tools.gen_from_prompts import PromptOrder, read_prompts

PROMPTS = ["a red circle", "a blue square, white background", "a green triangle"]


@pytest.fixture
def gen(demo_model_dir):
    """``hcp tools gen-from-prompts`` on the demo model, tiny and fast, through the real CLI."""
    fast = ["--model", str(demo_model_dir), "--steps", "2", "--width", "64", "--height", "64", "--batch-size", "2"]
    return lambda *args: cli.main(["tools", "gen-from-prompts", *fast, *map(str, args)])


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.suffix in (".png", ".txt")}


def test_parquet_prompts_images_captions_and_resume(tmp_path, gen) -> None:
    db = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": PROMPTS + [None]}), db)
    out = tmp_path / "reg"
    assert gen("--prompt-file", db, "--column", "text", "--out", out, "--num", 2) == 0
    first = snapshot(out)
    assert sorted(first) == ["000000.png", "000000.txt", "000001.png", "000001.txt"]

    assert gen("--prompt-file", db, "--column", "text", "--out", out, "--num", 4) == 0  # "interrupted", then more
    after = snapshot(out)
    assert sorted(after) == [f"{i:06d}.{ext}" for i in range(4) for ext in ("png", "txt")]
    assert {k: after[k] for k in first} == first, "a rerun rewrote images it already had"
    assert gen("--prompt-file", db, "--column", "text", "--out", out, "--num", 4) == 0
    assert snapshot(out) == after

    captions = [(out / f"{i:06d}.txt").read_text(encoding="utf-8").strip() for i in range(4)]
    assert set(captions[:3]) == set(PROMPTS), "the first round should use each prompt once"
    # the image_folder source reads them, each with its caption
    raw = {"model": {"pretrained": "unused"}, "data": {"reg": {
        "sources": [{"type": "image_folder", "img_root": str(out)}], "bucket": {"type": "fixed", "target_size": [64, 64]}}}}
    p = build_pipeline(raw, base_dir=str(tmp_path))
    records, problems = scan_sources("reg", p.data["reg"], registry=p.registry, base_dir=str(tmp_path))
    assert not problems
    assert sorted((r.image.rsplit("/", 1)[-1], r.caption) for r in records) == [
        (f"{i:06d}.png", captions[i]) for i in range(4)]


def test_other_settings_into_the_same_folder_are_refused(tmp_path, gen, capsys) -> None:
    out = tmp_path / "reg"
    assert gen("--prompt", "a picture of a shape", "--out", out, "--num", 1) == 0
    assert gen("--prompt", "a picture of a shape", "--out", out, "--num", 2, "--seed", 5) == 2
    assert "other settings (seed: 0 then, 5 now)" in capsys.readouterr().err
    assert gen("--prompt-file", tmp_path / "missing.parquet", "--out", tmp_path / "x") == 2
    assert "does not exist" in capsys.readouterr().err


def test_prompt_files_and_order(tmp_path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n  two  \nthree\n", encoding="utf-8")
    assert read_prompts(txt) == ["one", "two", "three"]
    db = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "other": ["a", "b"]}), db)
    assert read_prompts(db) == ["x", "y"]  # the first column by default
    with pytest.raises(Exception, match="--column 'nope' is not in .*its columns: prompt, other"):
        read_prompts(db, "nope")
    order = PromptOrder(5, seed=1)
    rounds = [[order[i] for i in range(r * 5, r * 5 + 5)] for r in range(3)]
    assert all(sorted(r) == list(range(5)) for r in rounds) and rounds[0] != rounds[1]
    assert [order[i] for i in range(15)] == [PromptOrder(5, seed=1)[i] for i in range(15)]
    assert Counter(PromptOrder(3, seed=2)[i] for i in range(9)) == {0: 3, 1: 3, 2: 3}


def test_samplers_are_hcp_generates_and_sdxl_models_work(tmp_path, gen, sdxl_model_dir, capsys) -> None:
    """The sampler names are ``hcp generate``'s (the tool's old ``dpm++`` still means DPM++ 2M), and
    an SDXL model renders what ``hcp generate`` renders for the same prompt, seed and settings."""
    from hcp_core.tools.gen_from_prompts import image_seed

    assert gen("--prompt", "x", "--out", tmp_path / "bad", "--sampler", "dpm2") == 2
    err = capsys.readouterr().err
    assert "--sampler: unknown scheduler 'dpm2'" in err and "dpm++_2m_karras" in err and not (tmp_path / "bad").exists()

    settings = ["--steps", "2", "--width", "64", "--height", "48", "--negative-prompt", "lowres", "--cfg", "5"]
    args = ["tools", "gen-from-prompts", "--model", str(sdxl_model_dir), "--prompt", "a red circle", "--num", "1",
            "--out", str(tmp_path / "xl"), "--sampler", "dpm++", *settings]
    assert cli.main(args) == 0
    generated = ["generate", "--model", str(sdxl_model_dir), "-p", "a red circle", "--seed", str(image_seed(0, 0)),
                 "--scheduler", "dpm++_2m", "--steps", "2", "--size", "64x48", "--negative-prompt", "lowres",
                 "--cfg", "5", "--out", str(tmp_path / "gen")]  # fmt: skip
    assert cli.main(generated) == 0
    ours = np.asarray(Image.open(tmp_path / "xl" / "000000.png").convert("RGB")).astype(int)
    (reference,) = (tmp_path / "gen").glob("*.png")
    assert np.abs(ours - np.asarray(Image.open(reference).convert("RGB")).astype(int)).max() <= 1
    assert (tmp_path / "xl" / "000000.txt").read_text(encoding="utf-8").strip() == "a red circle"
