"""Custom-word files: reading, writing and scanning folders of textual-inversion embeddings.

A word is stored per text encoder ("part") it has vectors for:

* **SD 1.x / 2.x** (one text encoder, part ``text_encoder``): the A1111 ``.pt`` layout
  (``{"string_to_param": {"*": T[N, dim]}, "name", "step", ...}``), ``.safetensors`` holding one
  tensor (``{name: T[N, dim]}``, or webui's ``emb_params``), diffusers' ``learned_embeds.bin``, or a
  bare tensor.
* **SDXL** (parts ``text_encoder`` and ``text_encoder_2``): ``{"clip_l": T[N, 768], "clip_g":
  T[N, 1280]}``, the layout webui, ComfyUI and kohya read and write, as ``.safetensors`` or ``.pt``.
  Both sets have the same number of rows ``N``: the word takes ``N`` positions in each encoder's
  prompt.

Which layout a model uses follows from its **CLIP text encoders** (:func:`parts_of` given the
model): one CLIP (SD 1.x/2.x, and FLUX, whose T5 is not prompt-tuned) reads the single-encoder
layouts, plus a ``{"clip_l": T}`` dict (ComfyUI's key for FLUX's CLIP-L); two CLIPs (SDXL, and SD3
with CLIP-L and CLIP-G; its T5 is not prompt-tuned) read ``{clip_l, clip_g}``. Other text encoders
(T5) never get custom-word vectors.

Pickled files are read with ``torch.load(weights_only=True)``, never unpickling arbitrary objects.
A word's name is its file's stem. Files are written under a temporary name and renamed, so a
reader never sees half a file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import DataError
from ..fileio import atomic_write

#: File suffixes a folder of custom words is scanned for.
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
#: The text encoders a word has vectors for, by model kind.
SD_PARTS: Tuple[str, ...] = ("text_encoder",)
SDXL_PARTS: Tuple[str, ...] = ("text_encoder", "text_encoder_2")
#: SDXL file key of each text encoder's vectors (CLIP ViT-L, OpenCLIP bigG).
SDXL_FILE_KEYS: Dict[str, str] = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
#: A1111 files carry a token id for their "*" placeholder (265 is "*" in SD's CLIP vocabulary);
#: readers ignore it, but some older loaders expect the key.
_A1111_STAR_TOKEN = 265

PathLike = Union[str, os.PathLike]
#: A word's vectors: part name -> ``[N, dim]``.
WordVectors = Dict[str, torch.Tensor]


class EmbeddingFileError(DataError):
    """A custom-word file hcp cannot read, or one that does not fit the model."""


#: Model parts that may hold a text encoder, in order.
_TEXT_ENCODER_PARTS: Tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")


def is_clip_text_encoder(module: Any) -> bool:
    """Whether ``module`` is a CLIP text model (transformers' ``CLIPTextModel`` or ``...WithProjection``)."""
    if module is None:
        return False
    model_type = str(getattr(getattr(module, "config", None), "model_type", "") or "")
    return model_type in ("clip_text_model", "clip") or type(module).__name__.startswith("CLIPText")


def parts_of(kind: Any) -> Tuple[str, ...]:
    """The text encoders a custom word has vectors for.

    ``kind`` is a loaded model (a :class:`~hcp_core.interfaces.ModelBundle`): its CLIP text
    encoders, in part order: :data:`SD_PARTS` for one (SD 1.x/2.x; FLUX, whose second encoder is
    T5), :data:`SDXL_PARTS` for two (SDXL; SD3, whose third is T5). A model with no CLIP text encoder
    falls back to its ``kind``. ``kind`` may also be the kind string itself: "sdxl" gives
    :data:`SDXL_PARTS`, any other :data:`SD_PARTS`.
    """
    if isinstance(kind, str):
        return SDXL_PARTS if kind == "sdxl" else SD_PARTS
    found = tuple(p for p in _TEXT_ENCODER_PARTS if is_clip_text_encoder(getattr(kind, p, None)))
    if not found:
        return parts_of(str(getattr(kind, "kind", "sd")))
    if found not in (SD_PARTS, SDXL_PARTS):
        raise EmbeddingFileError(f"custom words support models with one or two CLIP text encoders "
                                 f"(text_encoder, text_encoder_2); this one has CLIP in {', '.join(found)}")
    return found


# --------------------------------------------------------------------------- reading
def _read_raw(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EmbeddingFileError(f"custom word file {path} does not exist") from None
    except Exception as exc:  # unpickling refused, corrupt file, not a safetensors file ...
        raise EmbeddingFileError(
            f"custom word file {path} cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "hcp reads .pt files with torch.load(weights_only=True) and never unpickles other objects. "
            "Re-save it as .safetensors holding one tensor [N, dim]."
        ) from None


def _as_vectors(value: Any, path: Path, what: str = "") -> torch.Tensor:
    """``value`` as float32 ``[N, dim]`` vectors, or an error naming the file (and key)."""
    where = f"{path}" + (f" ('{what}')" if what else "")
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFileError(f"custom word file {where}: expected a tensor, got {type(value).__name__}")
    if value.dim() == 1:  # one vector saved without its row axis (diffusers' learned_embeds.bin)
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.numel() == 0 or not value.is_floating_point():
        raise EmbeddingFileError(
            f"custom word file {where}: expected float vectors of shape [N, dim] (N, dim at least 1), "
            f"got {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "infinite"
        raise EmbeddingFileError(
            f"custom word file {where} holds {bad} values (saved from a diverged run); "
            "use an earlier export or create the word again with 'hcp tools create-embedding'"
        )
    return value.detach().to(torch.float32).contiguous()


def _is_sdxl_data(data: Any) -> bool:
    return isinstance(data, Mapping) and any(key in data for key in SDXL_FILE_KEYS.values())


def _single_vectors(data: Any, path: Path) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if not isinstance(data, Mapping):
        raise EmbeddingFileError(f"custom word file {path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingFileError(f"custom word file {path}: 'string_to_param' must hold exactly one tensor")
        return next(iter(params.values()))
    if "emb_params" in data:  # webui's safetensors layout
        return data["emb_params"]
    if "clip_g" in data:
        raise EmbeddingFileError(
            f"custom word file {path} is an SDXL embedding (clip_l / clip_g); it does not fit this model's one CLIP text encoder (SD 1.x/2.x)"
        )
    if "clip_l" in data:  # ComfyUI's (and OneTrainer's) key of CLIP-L vectors, e.g. a FLUX embedding
        others = [str(k) for k in data if k != "clip_l"]
        if others:
            raise EmbeddingFileError(
                f"custom word file {path} holds vectors for other text encoders too ({', '.join(others[:4])}); this "
                "model's custom words have CLIP-L vectors only (hcp does not prompt-tune T5): keep only 'clip_l'"
            )
        return data["clip_l"]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        keys = ", ".join(map(str, list(data)[:6]))
        raise EmbeddingFileError(
            f"custom word file {path}: expected one tensor (or the A1111 'string_to_param' layout), "
            + (f"found keys {keys}" if keys else "found an empty file")
        )
    return tensors[0]


def _sdxl_vectors(data: Any, path: Path) -> WordVectors:
    if not _is_sdxl_data(data) or not all(key in data for key in SDXL_FILE_KEYS.values()):
        what = "holds one vector set (an SD 1.x/2.x embedding)" if not _is_sdxl_data(data) else (
            f"has only {', '.join(k for k in SDXL_FILE_KEYS.values() if k in data)}")  # fmt: skip
        raise EmbeddingFileError(
            f"custom word file {path} {what}; an SDXL model (or another with two CLIP text encoders) needs vectors for "
            "both, stored as {clip_l: [N, 768], clip_g: [N, 1280]}. Create such words with "
            "'hcp tools create-embedding MODEL NAME N'."
        )
    vectors = {part: _as_vectors(data[key], path, key) for part, key in SDXL_FILE_KEYS.items()}
    rows = {SDXL_FILE_KEYS[part]: int(v.shape[0]) for part, v in vectors.items()}
    if len(set(rows.values())) != 1:
        raise EmbeddingFileError(
            f"custom word file {path}: clip_l and clip_g must have the same number of vectors, got {rows}"
        )
    return vectors


def read_word_file(path: PathLike, parts: Sequence[str] = SD_PARTS) -> WordVectors:
    """The vectors of the custom word in ``path``, per text encoder in ``parts`` (see :func:`parts_of`).

    ``parts`` = :data:`SD_PARTS` reads every single-encoder layout; :data:`SDXL_PARTS` reads the
    ``{clip_l, clip_g}`` layout. A file of the other kind is an :class:`EmbeddingFileError` that
    says so.
    """
    path = Path(path)
    data = _read_raw(path)
    if tuple(parts) == SDXL_PARTS:
        return _sdxl_vectors(data, path)
    if tuple(parts) != SD_PARTS:
        raise ValueError(f"no custom-word layout for text encoders {tuple(parts)}")
    return {SD_PARTS[0]: _as_vectors(_single_vectors(data, path), path)}


def read_embedding(path: PathLike) -> torch.Tensor:
    """The vectors ``[N, dim]`` (float32, CPU) of a single-encoder (SD 1.x/2.x) custom-word file."""
    return read_word_file(path, SD_PARTS)[SD_PARTS[0]]


# --------------------------------------------------------------------------- writing
def write_embedding(
    path: PathLike, name: str, vectors: Union[torch.Tensor, Mapping[str, torch.Tensor]], *,
    step: Optional[int] = None, model: Optional[str] = None,
) -> Path:  # fmt: skip
    """Write custom word ``name``; the format follows the suffix. Returns the path.

    ``vectors`` is a tensor ``[N, dim]`` (one text encoder) or a mapping part -> tensor for SDXL
    (:data:`SDXL_PARTS`). One encoder: ``.pt`` in the A1111 layout (``string_to_param`` -> ``*``,
    plus ``name``, ``step``, ``sd_checkpoint_name``), ``.safetensors`` as ``{name: tensor}``.
    SDXL: ``{clip_l, clip_g}`` in either format; the ``.pt`` holds nothing else, since webui reads
    every entry of such a dict as a tensor.
    """
    path = Path(path)
    if isinstance(vectors, Mapping):
        if set(vectors) != set(SDXL_PARTS):
            raise ValueError(f"per-encoder vectors must be given for {SDXL_PARTS}, got {tuple(vectors)}")
        tensors = {SDXL_FILE_KEYS[part]: _plain(v) for part, v in vectors.items()}
    else:
        tensors = {name: _plain(vectors)}
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".bin"):
        raise ValueError(f"{path}: custom words are written as .pt or .safetensors")

    def write(tmp: str) -> None:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt", "name": name, "step": str(step or 0)})
        elif isinstance(vectors, Mapping):
            torch.save(tensors, tmp)
        else:
            torch.save({
                "string_to_token": {"*": _A1111_STAR_TOKEN},
                "string_to_param": {"*": tensors[name]},
                "name": name,
                "step": int(step or 0),
                "sd_checkpoint": None,
                "sd_checkpoint_name": model,
            }, tmp)  # fmt: skip

    atomic_write(path, write)
    return path


def _plain(vectors: torch.Tensor) -> torch.Tensor:
    tensor = vectors.detach().to("cpu", torch.float32).contiguous().clone()
    if tensor.dim() != 2:
        raise ValueError(f"vectors must be [N, dim], got shape {tuple(tensor.shape)}")
    return tensor


# --------------------------------------------------------------------------- folders
def embedding_files(emb_dir: PathLike) -> Dict[str, List[Path]]:
    """Word name -> its files in ``emb_dir`` (top level only; sub-folders are not scanned).

    A word may have a ``.pt`` and a ``.safetensors`` file (what an export writes). Names that
    differ only in case are the same word and are listed together under the first one found.
    """
    folder = Path(emb_dir)
    if not folder.is_dir():
        raise EmbeddingFileError(f"custom word folder {folder} does not exist (or is not a folder)")
    found: Dict[str, List[Path]] = {}
    canonical: Dict[str, str] = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.startswith(".") or file.suffix.lower() not in EMBEDDING_SUFFIXES:
            continue
        name = canonical.setdefault(file.stem.lower(), file.stem)
        found.setdefault(name, []).append(file)
    return found


def load_word_sets(emb_dir: PathLike, parts: Sequence[str] = SD_PARTS) -> Dict[str, WordVectors]:
    """Every custom word in ``emb_dir``: name (file stem) -> part -> vectors ``[N, dim]``.

    Two files of one word must hold the same vectors; otherwise it is an error naming both.
    """
    words: Dict[str, WordVectors] = {}
    for name, files in embedding_files(emb_dir).items():
        first = read_word_file(files[0], parts)
        for other in files[1:]:
            again = read_word_file(other, parts)
            if any(again[p].shape != first[p].shape or not torch.equal(again[p], first[p]) for p in first):
                raise EmbeddingFileError(
                    f"custom word '{name}' is defined twice with different vectors: {files[0]} and {other}; "
                    "remove one of them"
                )
        words[name] = first
    return words


def load_embeddings(emb_dir: PathLike) -> Dict[str, torch.Tensor]:
    """Every single-encoder custom word in ``emb_dir``: name -> vectors ``[N, dim]``."""
    return {name: sets[SD_PARTS[0]] for name, sets in load_word_sets(emb_dir, SD_PARTS).items()}
