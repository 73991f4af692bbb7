"""Exported files get the umask's mode (0644 under 022), are written atomically, and a full or
read-only disk is one message naming the file, with the previous file left intact."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from hcp_core.errors import UserError
from hcp_core.fileio import FileWriteError, atomic_write, current_umask, default_file_mode
from hcp_core.generation.metadata import write_png
from hcp_core.models.custom_word_files import read_embedding, write_embedding
from hcp_plugins.adapters.lora.lora_file import read_lora_file, write_lora_file
from hcp_plugins.adapters.lora.weights import ExportLayer, LoraWeights


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def lora_layers(value: float = 1.0) -> list[ExportLayer]:
    return [ExportLayer("unet", "conv_in", LoraWeights(torch.full((2, 4, 3, 3), value), torch.full((8, 2, 1, 1), value), 2.0))]


def test_umask_is_read_without_changing_it(umask_022):
    assert current_umask() == 0o022 and default_file_mode() == 0o644
    os.umask(0o027)
    assert current_umask() == 0o027 and default_file_mode() == 0o640
    assert os.umask(0o022) == 0o027  # reading left it as it was


def test_every_exported_file_is_0644_under_umask_022(umask_022, tmp_path):
    lora = write_lora_file(tmp_path / "lora.safetensors", lora_layers())
    png = write_png(Image.new("RGB", (8, 8)), tmp_path / "img.png", "a prompt\nSteps: 2")
    pt = write_embedding(tmp_path / "word.pt", "word", torch.zeros(2, 16))
    st = write_embedding(tmp_path / "word.safetensors", "word", torch.zeros(2, 16))
    plain = atomic_write(tmp_path / "x.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    for path in (lora, png, pt, st, plain):
        assert mode(path) == 0o644, path
    assert leftovers(tmp_path) == []


def test_a_short_runs_lora_export_is_0644(umask_022, tmp_path, demo_model_dir, demo_data_dir, monkeypatch):
    import hcp_core

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text(f"""
exp_dir = "runs/x"
[model]
pretrained = "{demo_model_dir}"
[train]
max_steps = 1
save_every = 0
[data.d]
batch_size = 2
bucket = {{ type = "fixed", target_size = [32, 32] }}
[[data.d.sources]]
type = "image_folder"
img_root = "{demo_data_dir}"
prompt_template = "{{caption}}"
[[lora_unet]]
lr = 1e-3
rank = 2
layers = ['re:.*attn1$']
""")
    result = hcp_core.run(hcp_core.load_config("p.toml"))
    exports = [Path(p) for p in result.exports]
    assert exports and all(mode(p) == 0o644 for p in exports), [(p, oct(mode(p))) for p in exports]


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, r"disk full while writing .*lora.safetensors; free space and resume"),
    (errno.EROFS, r"lora.safetensors is on a read-only file system"),
    (errno.EACCES, r"no permission to write .*lora.safetensors"),
])  # fmt: skip
def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch, code, message):
    import safetensors.torch

    path = tmp_path / "lora.safetensors"
    write_lora_file(path, lora_layers(1.0))
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(FileWriteError, match=message) as info:
        write_lora_file(path, lora_layers(2.0))
    assert isinstance(info.value, UserError) and str(path) in str(info.value)
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert read_lora_file(path).weights["lora_unet_conv_in"].down.flatten()[0] == 1.0


def test_a_full_disk_reported_by_safetensors_itself_is_recognised(tmp_path):
    # safetensors' Rust writer raises its own error type with the OS error in the message.
    class SafetensorError(Exception):
        pass

    def rust_writer(tmp: str) -> None:
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    with pytest.raises(FileWriteError, match="disk full while writing"):
        atomic_write(tmp_path / "a.safetensors", rust_writer)
    assert list(tmp_path.iterdir()) == []


def test_png_and_embedding_writes_leave_nothing_behind_on_enospc(tmp_path, monkeypatch):
    png = write_png(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "img.png", "first")
    word = write_embedding(tmp_path / "w.pt", "w", torch.ones(1, 4))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(FileWriteError, match=r"disk full while writing .*img.png"):
        write_png(Image.new("RGB", (8, 8)), png, "second")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(FileWriteError, match=r"disk full while writing .*w.pt"):
        write_embedding(word, "w", torch.zeros(1, 4))
    assert leftovers(tmp_path) == []
    assert read_embedding(word).sum() == 4
    with Image.open(png) as im:
        assert im.getpixel((0, 0)) == (1, 2, 3)


def test_other_errors_propagate_unchanged(tmp_path):
    def bug(tmp: str) -> None:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "f", bug)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- reading embeddings
_NAN_ROWS = torch.zeros(2, 16)
_NAN_ROWS[1, 3] = float("nan")
BROKEN_WORDS = {
    "nan.safetensors": ({"w": _NAN_ROWS}, "holds NaN values"),
    "inf.safetensors": ({"w": torch.full((1, 16), float("inf"))}, "holds infinite values"),
    "ints.safetensors": ({"w": torch.ones(2, 16, dtype=torch.int32)}, r"expected float vectors .* got int32 \(2, 16\)"),
    "ndim.safetensors": ({"w": torch.ones(2, 16, 1)}, r"expected float vectors .* got float32 \(2, 16, 1\)"),
    "empty.safetensors": ({"w": torch.ones(0, 16)}, r"got float32 \(0, 16\)"),
    "nokeys.safetensors": ({}, "found an empty file"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BROKEN_WORDS))
def test_broken_embedding_files_name_the_file(tmp_path, name):
    from safetensors.torch import save_file

    from hcp_core.models.custom_word_files import EmbeddingFileError

    tensors, message = BROKEN_WORDS[name]
    save_file(tensors, str(tmp_path / name))
    with pytest.raises(EmbeddingFileError, match=message) as info:
        read_embedding(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("content", [b"not a pickle", "objects"])
def test_embedding_pt_that_is_not_tensors_is_one_message(tmp_path, content):
    from hcp_core.models.custom_word_files import EmbeddingFileError

    path = tmp_path / "w.pt"
    if content == "objects":
        torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "evil": Path("x")}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(EmbeddingFileError, match=r"cannot be read safely") as info:
        read_embedding(path)
    assert str(path) in str(info.value)


def test_generate_with_a_nan_embedding_exits_2(tmp_path, demo_model_dir, capsys):
    from safetensors.torch import save_file

    from hcp_core import cli

    (tmp_path / "emb").mkdir()
    save_file({"w": _NAN_ROWS[:, :8].clone()}, str(tmp_path / "emb" / "w.safetensors"))
    code = cli.main(["generate", "--model", str(demo_model_dir), "--embeddings", str(tmp_path / "emb"), "-p", "w",
                     "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "w.safetensors" in err and "holds NaN values" in err
