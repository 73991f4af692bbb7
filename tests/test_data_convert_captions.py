"""``hcp tools convert-captions``: .txt captions -> one JSON the loader picks up."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from hcp_core.config import build_pipeline
from hcp_core.data.prepare import prepare_dataset
from hcp_core.errors import DataError, UserError
from hcp_core.tools.convert_captions import convert_captions, main


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for rel, caption in {"a.png": "a cat\n", "b.jpg": "a dog, sofa", "sub/c.png": "  line one\nline two  "}.items():
        Image.new("RGB", (16, 16)).save(root / rel)
        (root / rel).with_suffix(".txt").write_text(caption, encoding="utf-8")
    Image.new("RGB", (16, 16)).save(root / "nocap.webp")
    return root


def test_writes_relative_path_keys(folder):
    out = convert_captions(folder, recursive=True)
    assert out == folder / "image_captions.json"
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "a.png": "a cat",
        "b.jpg": "a dog, sofa",
        "sub/c.png": "line one line two",
    }


def test_loader_picks_up_the_converted_file(folder, tmp_path):
    convert_captions(folder, recursive=True)
    for txt in folder.rglob("*.txt"):
        txt.unlink()  # only the JSON is left
    raw = {"model": {"pretrained": "x"}, "data": {"ds": {"bucket": {"type": "fixed"}, "sources": [{"type": "image_folder", "img_root": "data", "recursive": True}]}}}
    p = build_pipeline(raw, base_dir=str(tmp_path))
    prepared = prepare_dataset("ds", p.data["ds"], registry=p.registry, base_dir=p.base_dir)
    captions = {r.image.split("data/")[1]: r.caption for r in prepared.records}
    assert captions == {"a.png": "a cat", "b.jpg": "a dog, sofa", "sub/c.png": "line one line two", "nocap.webp": None}
    assert [str(x) for x in prepared.problems] == [f"{folder / 'nocap.webp'}: image has no caption (trained with an empty {{caption}})"]


def test_main_and_out_option(folder, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "caps.json"
    assert main([str(folder), "--out", str(target), "--recursive"]) == 0
    assert json.loads(target.read_text(encoding="utf-8"))["a.png"] == "a cat"
    out = capsys.readouterr().out
    assert f"wrote 3 caption(s) to {target}" in out and "nocap.webp" in out
    assert main(["--help"]) == 0


def test_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        convert_captions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image under .* has a .txt caption"):
        convert_captions(tmp_path / "empty")
    with pytest.raises(UserError, match="unknown option '--bogus'"):
        main([str(tmp_path), "--bogus"])
    with pytest.raises(UserError, match="DATA_ROOT is missing"):
        main([])
