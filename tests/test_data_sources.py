"""The image_folder source on real, messy folders; captions; ``hcp check``'s data report."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hcp_core.config import build_pipeline
from hcp_core.data.prepare import prepare_dataset
from hcp_core.train.preflight import check_pipeline
from hcp_core.errors import DataError


def pipeline(tmp_path, source, bucket=None, **dataset):
    raw = {
        "model": {"pretrained": "unused"},
        "data": {"ds": {"sources": [{"type": "image_folder", **source}], "bucket": bucket or {"type": "fixed", "target_size": [32, 32]}, **dataset}},
    }
    return build_pipeline(raw, base_dir=str(tmp_path))


def prepare(p, **kw):
    return prepare_dataset("ds", p.data["ds"], registry=p.registry, base_dir=p.base_dir, seed=p.seed, **kw)


def save(im, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def header_only_png(path, w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))


@pytest.fixture
def messy(tmp_path):
    """A folder with good images in every mode and one of every bad-file case."""
    root = tmp_path / "imgs"
    masks = tmp_path / "masks"
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise)
    save(rgb, root / "good1.png")
    save(rgb, root / "good2.jpg")
    save(rgb, root / "good3.webp")
    save(rgb, root / "good4.bmp")
    save(rgb, root / "sub" / "good5.png")
    save(rgb.convert("RGBA"), root / "rgba.png")
    save(rgb.convert("CMYK"), root / "cmyk.jpg")
    save(rgb.convert("P"), root / "pal.png")
    save(Image.fromarray((noise[..., 0].astype(np.uint16) * 257)), root / "g16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(rgb, root / "exif6.jpg", exif=exif)
    (root / "zero.png").write_bytes(b"")
    (root / "notimage.jpg").write_text("hello")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (root / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    header_only_png(root / "bomb.png", 40000, 40000)
    save(rgb, root / "nocap.png")
    (root / "notes.md").write_text("# readme")
    for stem in ("good1", "good2", "good3", "good4", "sub/good5", "rgba", "cmyk", "pal", "g16", "exif6", "trunc", "zero", "bomb"):
        (root / f"{stem}.txt").write_text(f"caption of {stem.split('/')[-1]}, tag")
    (root / "orphan.txt").write_text("caption without an image")
    save(Image.new("L", (64, 48), 255), masks / "good1.png")
    save(Image.new("L", (32, 24), 255), masks / "good2.png")  # half size, same aspect: stretched
    save(Image.new("L", (48, 48), 255), masks / "rgba.png")  # other aspect: ignored
    (masks / "cmyk.png").write_bytes(b"broken")  # unreadable: ignored
    save(Image.new("L", (48, 64), 0), masks / "exif6.png")  # matches the displayed (rotated) size
    save(Image.new("L", (8, 8), 0), masks / "lonely.png")
    return tmp_path


EXPECTED_PROBLEMS = {
    "imgs/zero.png": ("empty file", "skipped"),
    "imgs/notimage.jpg": ("not an image", "skipped"),
    "imgs/bomb.png": ("too large", "skipped"),
    "imgs/orphan.txt": ("caption with no image", "ignored"),
    "imgs/nocap.png": ("no caption", "empty {caption}"),
    "imgs/notes.md": ("not an image file", "ignored"),
    "masks/good2.png": ("mask size 32x24 differs from its image's 64x48", "stretched"),
    "masks/rgba.png": ("differs", "mask ignored"),
    "masks/cmyk.png": ("unusable mask", "mask ignored"),
    "masks/lonely.png": ("mask with no image", "ignored"),
}


def test_scan_finds_good_images_and_names_every_problem(messy):
    p = pipeline(messy, {"img_root": "imgs", "att_mask": "masks", "prompt_template": "art, {caption}", "recursive": True})
    prepared = prepare(p)
    names = sorted(r.image.split("imgs/")[1] for r in prepared.records)
    assert names == sorted(["good1.png", "good2.jpg", "good3.webp", "good4.bmp", "sub/good5.png", "rgba.png", "cmyk.jpg",
                            "pal.png", "g16.png", "exif6.jpg", "nocap.png", "trunc.png"])  # trunc: header is fine
    problems = {p.path.split(str(messy) + "/")[1]: p for p in prepared.problems}
    assert set(problems) == set(EXPECTED_PROBLEMS)
    for path, (what, action) in EXPECTED_PROBLEMS.items():
        assert what in problems[path].what and action in problems[path].action, problems[path]
    by_name = {r.image.rsplit("/", 1)[1]: r for r in prepared.records}
    assert by_name["exif6.jpg"].size == (48, 64)  # EXIF orientation 6 swaps the header size
    assert by_name["good1.png"].mask.endswith("masks/good1.png") and by_name["good2.jpg"].mask is not None
    assert by_name["rgba.png"].mask is None and by_name["cmyk.jpg"].mask is None
    assert by_name["good5.png"].caption == "caption of good5, tag"
    assert by_name["nocap.png"].caption is None


def test_verify_finds_truncated_files(messy):
    p = pipeline(messy, {"img_root": "imgs"})
    prepared = prepare(p, verify_images=True)
    assert not any(r.image.endswith("trunc.png") for r in prepared.records)
    [trunc] = [x for x in prepared.problems if x.path.endswith("trunc.png")]
    assert "truncated" in trunc.what and trunc.action == "skipped"


def test_hcp_check_lists_every_problem_by_path_and_the_bucket_table(messy):
    p = pipeline(messy, {"img_root": "imgs", "att_mask": "masks", "recursive": True}, {"type": "ratio", "from": "images", "num_buckets": 2, "target_area": 4096, "step": 16})
    out = io.StringIO()
    assert check_pipeline(p, out=out, check_model_layers=False) is True
    text = out.getvalue()
    for rel in list(EXPECTED_PROBLEMS) + ["imgs/trunc.png"]:
        assert str(messy / rel) in text, rel
    assert "size (WxH)" in text and "mean aspect error" in text
    assert "data.ds: 11 images" in text
    strict = io.StringIO()
    assert check_pipeline(p, out=strict, strict=True, check_model_layers=False) is False


def test_caption_file_json_keys_by_path_name_or_stem(tmp_path):
    for rel in ("a.png", "b.png", "sub/c.png", "sub/d.png"):
        save(Image.new("RGB", (16, 16)), tmp_path / "imgs" / rel)
    (tmp_path / "imgs" / "a.txt").write_text("from txt")
    (tmp_path / "imgs" / "b.txt").write_text("from txt b")
    (tmp_path / "caps.json").write_text(json.dumps({"b.png": "json b", "sub/c.png": "json c", "d": ["tag1", "tag2"], "ghost.png": "x"}))
    prepared = prepare(pipeline(tmp_path, {"img_root": "imgs", "caption_file": "caps.json", "recursive": True}))
    caps = {r.image.split("imgs/")[1]: r.caption for r in prepared.records}
    assert caps == {"a.png": "from txt", "b.png": "json b", "sub/c.png": "json c", "sub/d.png": "tag1, tag2"}
    [ghost] = prepared.problems
    assert ghost.path.endswith("caps.json") and "'ghost.png' matches no image" in ghost.what


def test_caption_file_yaml(tmp_path):
    save(Image.new("RGB", (16, 16)), tmp_path / "x.jpg")
    (tmp_path / "caps.yaml").write_text("x.jpg: a yaml caption\n")
    [record] = prepare(pipeline(tmp_path, {"img_root": ".", "caption_file": "caps.yaml"})).records
    assert record.caption == "a yaml caption"


def test_bad_caption_file_is_a_clear_error(tmp_path):
    save(Image.new("RGB", (16, 16)), tmp_path / "x.jpg")
    (tmp_path / "caps.json").write_text("{not json")
    with pytest.raises(DataError, match=r"caption file .*caps.json is not valid JSON"):
        prepare(pipeline(tmp_path, {"img_root": ".", "caption_file": "caps.json"}))


def test_repeat_and_recursive(tmp_path):
    save(Image.new("RGB", (16, 16)), tmp_path / "a.png")
    save(Image.new("RGB", (16, 16)), tmp_path / "deep" / "b.png")
    prepared = prepare(pipeline(tmp_path, {"img_root": ".", "repeat": 3, "prompt_template": "x", "recursive": True}))
    assert len(prepared.records) == 2 and prepared.num_samples == 6
    flat = prepare(pipeline(tmp_path, {"img_root": ".", "prompt_template": "x"}))
    assert [r.image.rsplit("/", 1)[1] for r in flat.records] == ["a.png"]


def test_no_missing_caption_reports_when_templates_do_not_use_captions(tmp_path):
    save(Image.new("RGB", (16, 16)), tmp_path / "a.png")
    prepared = prepare(pipeline(tmp_path, {"img_root": ".", "prompt_template": "a photo of {w}", "word_names": {"w": "sks"}}))
    assert prepared.problems == []


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.ds: no usable images in its sources"):
        prepare(pipeline(tmp_path, {"img_root": "empty"}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable images.*\n.*x.png: empty file"):
        prepare(pipeline(tmp_path, {"img_root": "bad"}))
    with pytest.raises(DataError, match=r"img_root folder 'nowhere' does not exist"):
        prepare(pipeline(tmp_path, {"img_root": "nowhere"}))
    with pytest.raises(DataError, match=r"att_mask folder 'nomask' does not exist"):
        prepare(pipeline(tmp_path, {"img_root": "bad", "att_mask": "nomask"}))


def test_check_reports_empty_dataset_problems(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    out = io.StringIO()
    assert check_pipeline(pipeline(tmp_path, {"img_root": "bad"}), out=out) is False
    assert "ERROR: no usable images" in out.getvalue() and str(tmp_path / "bad" / "x.png") in out.getvalue()


# --------------------------------------------------------------------------- checks every source gets
def outside_pipeline(tmp_path, template):
    """A dataset whose only source comes from a plugin outside the tree (core_components' listing)."""
    import core_components
    from hcp_core.plugins import build_registry

    (tmp_path / "list.txt").write_text("a.png 64 48\nb.png 64 48 a red cube\n")
    raw = {"model": {"pretrained": "unused"},
           "data": {"ds": {"sources": [{"type": "test_listing", "listing": "list.txt", "prompt_template": template}],
                           "bucket": {"type": "fixed", "target_size": [32, 32]}}}}  # fmt: skip
    return build_pipeline(raw, build_registry(extra_plugins=[core_components]), base_dir=str(tmp_path))


def test_an_outside_sources_unfilled_placeholder_is_an_error_as_for_image_folder(tmp_path):
    from hcp_core.errors import ConfigError

    p = outside_pipeline(tmp_path, "a photo of {pt1}, {caption}")
    with pytest.raises(ConfigError, match=r"data\.ds\.sources\[0\] \(test_listing\): prompt template 'a photo of \{pt1\}, \{caption\}' has \{pt1\}"):
        prepare(p)


def test_an_outside_sources_missing_captions_are_reported_as_for_image_folder(tmp_path):
    prepared = prepare(outside_pipeline(tmp_path, "a photo of {caption}"))
    assert [str(x) for x in prepared.problems] == [f"{tmp_path / 'a.png'}: image has no caption (trained with an empty {{caption}})"]
    assert [r.caption for r in prepared.records] == [None, "a red cube"]


def test_records_masks_are_checked_in_the_core(tmp_path):
    from hcp_core.data.prepare import check_records
    from hcp_core.interfaces import ImageRecord

    save(Image.new("L", (32, 24), 255), tmp_path / "half.png")
    save(Image.new("L", (48, 48), 255), tmp_path / "square.png")
    records = [ImageRecord(str(tmp_path / f"{n}.png"), (64, 48), "c", str(tmp_path / f"{m}.png")) for n, m in
               [("a", "half"), ("b", "square"), ("c", "missing")]]  # fmt: skip
    kept, problems = check_records(records, "data.ds.sources[0] (x)")
    assert [r.mask for r in kept] == [str(tmp_path / "half.png"), None, None]
    assert [(p.path.rsplit("/", 1)[1], p.action) for p in problems] == [
        ("half.png", "mask stretched to the image size"), ("square.png", "mask ignored: weight 1 everywhere"),
        ("missing.png", "mask ignored: weight 1 everywhere")]
