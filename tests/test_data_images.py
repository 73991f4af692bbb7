"""Opening real-world image files: header sizes, EXIF, colour modes, bad files."""
from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hcp_core.data import images
from hcp_core.data.images import BadImage, load_gray, load_rgb, read_header, verify


def png_header_only(path, w, h):
    """A PNG whose header claims w x h but holds no pixel data (cheap stand-in for huge files)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_header_size_without_decoding(tmp_path, monkeypatch):
    path = png_header_only(tmp_path / "big.png", 3000, 2000)
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    header = read_header(str(path))
    assert header.size == (3000, 2000) and header.format == "PNG"


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("orientation, shown", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_swaps_header_size_and_pixels(tmp_path, orientation, shown, ext):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue (stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{ext}"
    im.save(path, exif=exif, quality=95)
    assert read_header(str(path)).size == shown
    rgb = load_rgb(str(path))
    assert rgb.size == shown
    arr = np.asarray(rgb).astype(int)
    # Orientation 6 = stored image must turn 90 degrees clockwise: the stored left edge ends on top.
    if orientation == 6:
        assert arr[1, 10, 2] > 200 and arr[-2, 10, 0] > 200
    if orientation == 8:
        assert arr[-2, 10, 2] > 200 and arr[1, 10, 0] > 200


def test_modes_become_rgb(tmp_path):
    base = np.zeros((8, 8, 3), dtype=np.uint8)
    base[..., 0] = 200
    cases = {}
    cases["cmyk.jpg"] = Image.fromarray(base).convert("CMYK")
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent
    rgba.paste((250, 0, 0, 255), (0, 0, 4, 8))  # opaque left half
    cases["rgba.png"] = rgba
    cases["la.png"] = Image.new("LA", (8, 8), (100, 0))
    cases["gray.png"] = Image.new("L", (8, 8), 77)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    cases["pal.png"] = pal
    cases["g16.png"] = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    cases["one.bmp"] = Image.new("1", (8, 8), 1)
    cases["x.webp"] = Image.fromarray(base)
    for name, im in cases.items():
        im.save(tmp_path / name)
    bg = (0, 0, 255)
    out = {name: np.asarray(load_rgb(str(tmp_path / name), background=bg)) for name in cases}
    for name, arr in out.items():
        assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8, name
    assert abs(int(out["cmyk.jpg"][4, 4, 0]) - 200) < 8
    assert tuple(out["rgba.png"][4, 1]) == (250, 0, 0)  # opaque part kept
    assert tuple(out["rgba.png"][4, 6]) == bg  # transparent part shows the background
    assert tuple(out["la.png"][0, 0]) == bg
    assert tuple(out["gray.png"][0, 0]) == (77, 77, 77)
    assert tuple(out["pal.png"][0, 0]) == (0, 255, 0)
    assert tuple(out["g16.png"][0, 0]) == (255, 255, 255)  # full 16-bit range scaled, not clipped garbage
    assert tuple(out["one.bmp"][0, 0]) == (255, 255, 255)


def test_sixteen_bit_scales_not_clips(tmp_path):
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "mid.png")  # 128 * 257
    assert np.asarray(load_rgb(str(tmp_path / "mid.png")))[0, 0, 0] == 128
    assert np.asarray(load_gray(str(tmp_path / "mid.png")))[0, 0] == 128


def test_bad_files_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.png").write_bytes(data[:20])
    with pytest.raises(BadImage, match="empty file"):
        read_header(str(tmp_path / "zero.png"))
    with pytest.raises(BadImage, match="not an image"):
        read_header(str(tmp_path / "text.jpg"))
    with pytest.raises(BadImage):
        read_header(str(tmp_path / "head.png"))
    # A truncated file has an intact header: only decoding finds it.
    assert read_header(str(tmp_path / "trunc.png")).size == (64, 64)
    with pytest.raises(BadImage, match="truncated"):
        verify(str(tmp_path / "trunc.png"))
    verify(str(good))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "photo.jpg")
    jpeg = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    assert read_header(str(tmp_path / "trunc.jpg")).size == (64, 64)
    with pytest.raises(BadImage, match="truncated"):
        verify(str(tmp_path / "trunc.jpg"))
    verify(str(tmp_path / "photo.jpg"))


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    huge = png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 MP, over twice PIL's limit
    with pytest.raises(BadImage, match="too large"):
        read_header(str(huge))
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(BadImage, match=r"100x100 = 10000 pixels is over the limit of 5000"):
        read_header(str(small), max_pixels=5000)
    # A raised limit lets hcp open what PIL alone would refuse, without changing PIL's setting.
    assert read_header(str(huge), max_pixels=10**9).size == (30000, 30000)
    assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS


def test_parse_colour():
    assert images.parse_colour("white") == (255, 255, 255)
    assert images.parse_colour("#102030") == (16, 32, 48)
    with pytest.raises(ValueError, match="unknown colour 'nope'"):
        images.parse_colour("nope")


# --------------------------------------------------------------------------- awkward folders
def _pipeline(root, img_root="imgs"):
    from hcp_core.config import build_pipeline

    raw = {"model": {"pretrained": "unused"},
           "data": {"ds": {"sources": [{"type": "image_folder", "img_root": img_root, "recursive": True}],
                           "bucket": {"type": "fixed", "target_size": [32, 32]}}}}  # fmt: skip
    return build_pipeline(raw, base_dir=str(root))


@pytest.fixture
def linked(tmp_path):
    """An image folder with a symlink loop, a dangling chain, a link back to its root, and a FIFO."""
    import os

    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "good.png")
    Image.new("RGB", (32, 32)).save(root / "sub" / "good2.png")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    os.symlink("chain2.png", root / "chain1.png")
    os.symlink("nowhere.png", root / "chain2.png")
    os.symlink("..", root / "sub" / "up")  # back to imgs/: would recurse forever
    os.mkfifo(root / "pipe.png")
    return tmp_path


def test_broken_links_are_problems_not_tracebacks(linked):
    from hcp_core.data.files import list_files

    problems = []
    files = list_files(str(linked / "imgs"), True, problems=problems)
    assert files == ["good.png", "sub/good2.png"]
    by_name = {p.path.rsplit("/", 1)[1]: p for p in problems}
    assert set(by_name) == {"loop_a.png", "loop_b.png", "chain1.png", "chain2.png", "up", "pipe.png"}
    assert "broken symbolic link (a symbolic link loop)" in by_name["loop_a.png"].what
    assert "broken symbolic link (to 'nowhere.png'" in by_name["chain2.png"].what
    assert "broken symbolic link" in by_name["chain1.png"].what
    assert "a loop" in by_name["up"].what and "not a regular file" in by_name["pipe.png"].what
    assert all(p.action == "skipped" for p in problems)


def test_hcp_check_and_the_run_list_broken_links(linked):
    import io

    from hcp_core.data.loader import build_train_data
    from hcp_core.train.preflight import check_pipeline

    out = io.StringIO()
    assert check_pipeline(_pipeline(linked), out=out, check_model_layers=False) is True
    text = out.getvalue()
    assert "data.ds: 2 images" in text and f"{linked / 'imgs' / 'loop_a.png'}: broken symbolic link" in text
    data = build_train_data(_pipeline(linked), verify_images=True)
    prepared = data.prepared["ds"]
    assert len(prepared.records) == 2 and sum(p.action == "skipped" for p in prepared.problems) == 6
    data.close()


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "imgs").symlink_to(root / "imgs"), "is a broken symbolic link (a symbolic link loop)"),
    (lambda root: (root / "imgs").write_text("x"), "is a file, not a folder"),
    (lambda root: (root / "imgs").symlink_to(root / "gone"), "is a broken symbolic link (to"),
    (lambda root: None, "does not exist"),
])  # fmt: skip
def test_an_img_root_that_is_no_folder_is_a_data_error_naming_it(tmp_path, make, message):
    import io

    from hcp_core.train.preflight import check_pipeline
    from hcp_core.errors import DataError
    from hcp_core.data.prepare import prepare_dataset

    make(tmp_path)
    p = _pipeline(tmp_path)
    with pytest.raises(DataError, match=r"img_root folder 'imgs' " + re.escape(message)):
        prepare_dataset("ds", p.data["ds"], registry=p.registry, base_dir=p.base_dir)
    out = io.StringIO()
    assert check_pipeline(p, out=out, check_model_layers=False) is False
    assert "data.ds: ERROR" in out.getvalue() and message in out.getvalue()


def test_unreadable_files_and_folders_are_problems(tmp_path, monkeypatch):
    import errno
    import os

    from hcp_core.data.files import list_files

    root = tmp_path / "imgs"
    (root / "locked").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "secret.png")
    real_open, real_scandir = images.Image.open, os.scandir

    def denied_open(path, *args, **kwargs):  # root can read everything: simulate the refusal
        if str(path).endswith("secret.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def denied_scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(images.Image, "open", denied_open)
    monkeypatch.setattr(os, "scandir", denied_scandir)
    with pytest.raises(BadImage, match=r"^cannot read file \(permission denied\)$"):
        read_header(str(root / "secret.png"))
    with pytest.raises(BadImage, match=r"^cannot read file \(permission denied\)$"):
        verify(str(root / "secret.png"))
    problems = []
    assert list_files(str(root), True, problems=problems) == ["secret.png"]
    [locked] = problems
    assert locked.path.endswith("locked") and locked.what == "cannot list folder (permission denied)"
