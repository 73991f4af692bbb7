"""``hcp tools create-embedding MODEL NAME N_TOKENS``: a new custom word of N token vectors.

``--init-text`` is a comma-separated list of parts, each one of:

* plain words (``cat``, ``red cat``): the model's own token vectors of those words (tokenized by
  the model's tokenizer, without BOS/EOS);
* ``*[std, len]``: ``len`` rows drawn from N(0, std^2).

The parts' rows are concatenated in order (``cat, *[0.01, 2], tail`` gives cat's vector, two random
rows, then tail's vector). The result is then fitted to N_TOKENS: extra rows at the end are
dropped; missing rows are added at the end, drawn from N(0, s^2) where s is the standard deviation
of the model's token embedding table (so they look like ordinary token vectors). Without
``--init-text`` all N rows are drawn that way. ``--seed`` makes the random rows reproducible.

The vectors are made for the model's CLIP text encoders only. For a model with two (SDXL, SD3)
the word gets one vector set per CLIP, each made this way from its own tokenizer and token table
(random rows come from one seeded stream, encoder 1 first), and the file holds ``{clip_l,
clip_g}``. A model with one CLIP (SD 1.x/2.x, FLUX's CLIP-L) gets one set, in the SD layouts. T5
encoders (FLUX, SD3) get none: they read the word's name as plain text.

The word is written to ``OUT/NAME.pt`` (A1111 layout) or ``OUT/NAME.safetensors``. A NAME the
tokenizer already reads as one token is refused (prompts could not use both), as is an existing
word file unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import attrs

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_RANDOM_PART = re.compile(r"^\*\s*\[\s*([^,\]]+?)\s*,\s*([^,\]]+?)\s*\]$")


@attrs.frozen
class RandomRows:
    """``*[std, length]``: ``length`` rows from N(0, std^2)."""

    std: float
    length: int


InitPart = Union[str, RandomRows]


def parse_init_text(text: str) -> List[InitPart]:
    """Split ``--init-text`` into plain-text parts and :class:`RandomRows` (commas inside ``[...]`` do not split)."""
    parts: List[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    out: List[InitPart] = []
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        if not raw.startswith("*"):
            out.append(raw)
            continue
        m = _RANDOM_PART.match(raw)
        if m is None:
            raise UserError(f"--init-text: {raw!r} is not a random part; write *[std, length], e.g. *[0.017, 2]")
        try:
            std, length = float(m.group(1)), int(m.group(2))
        except ValueError:
            raise UserError(f"--init-text: in {raw!r} std must be a number and length a whole number") from None
        if std < 0 or length < 1:
            raise UserError(f"--init-text: in {raw!r} std must be 0 or more and length at least 1")
        out.append(RandomRows(std, length))
    return out


def init_vectors(
    parts: Sequence[InitPart], n_tokens: int, *, tokenizer: Any, table: "torch.Tensor", generator: "torch.Generator"
) -> Tuple["torch.Tensor", List[str]]:
    """The ``[n_tokens, dim]`` start of a word from ``parts``; also notes on truncation / padding."""
    import torch

    dim = table.shape[1]
    rows: List[torch.Tensor] = []
    for part in parts:
        if isinstance(part, RandomRows):
            rows.append(torch.randn(part.length, dim, generator=generator) * part.std)
            continue
        ids = tokenizer(part, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"--init-text: {part!r} has no tokens")
        rows.append(table[torch.tensor(ids)].float())
    vectors = torch.cat(rows) if rows else torch.zeros(0, dim)
    notes: List[str] = []
    if vectors.shape[0] > n_tokens:
        notes.append(f"--init-text gives {vectors.shape[0]} rows; the last {vectors.shape[0] - n_tokens} are dropped")
        vectors = vectors[:n_tokens]
    elif vectors.shape[0] < n_tokens:
        missing = n_tokens - vectors.shape[0]
        std = float(table.float().std())
        if rows:
            notes.append(f"--init-text gives {vectors.shape[0]} rows; {missing} random row(s) with std {std:.4g} are added")
        vectors = torch.cat([vectors, torch.randn(missing, dim, generator=generator) * std])
    return vectors.contiguous(), notes


def _check_name(name: str) -> None:
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise UserError(f"NAME {name!r}: a custom word name must be non-empty and hold no spaces")
    if any(c in name for c in "/\\:*?\"<>|") or name.startswith("."):
        raise UserError(f"NAME {name!r}: a custom word name is a file name; leave out / \\ : * ? \" < > | and a leading dot")


#: Folder of each text encoder part's tokenizer in a diffusers model folder.
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def _clip_architecture(folder: Path) -> Optional[str]:
    """The transformers class a text-encoder folder's ``config.json`` names, when it is a CLIP
    text model (``CLIPTextModel``, ``CLIPTextModelWithProjection``); None otherwise (T5, no config)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = [str(a) for a in config.get("architectures") or []]
    if config.get("model_type") != "clip_text_model" and not any(a.startswith("CLIPText") for a in names):
        return None
    return "CLIPTextModelWithProjection" if "CLIPTextModelWithProjection" in names else "CLIPTextModel"


def _load_text_parts(model: str) -> Dict[str, Tuple[Any, "torch.Tensor"]]:
    """Text encoder part -> (tokenizer, token embedding table) of ``model``'s CLIP text encoders (a
    diffusers folder or a checkpoint): one part for SD 1.x/2.x and FLUX (CLIP-L; its T5 gets no
    custom-word vectors), two for SDXL and SD3 (CLIP-L and CLIP-G; SD3's T5 none)."""
    path = Path(model)
    if (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir():
        import transformers
        from transformers import CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        from ..models.custom_word_files import SD_PARTS, SDXL_PARTS

        transformers_logging.disable_progress_bar()  # a one-line tool needs no "Loading weights" bar
        classes = {part: _clip_architecture(path / part) for part in _TOKENIZER_OF
                   if (path / part).is_dir() and (path / _TOKENIZER_OF[part]).is_dir()}  # fmt: skip
        found = tuple(part for part, cls in classes.items() if cls is not None)
        if found not in (SD_PARTS, SDXL_PARTS):
            raise UserError(f"{model}: custom words need one or two CLIP text encoders (text_encoder, "
                            f"text_encoder_2); this model has CLIP in {', '.join(found) or 'none'}")
        loaded = {
            part: (CLIPTokenizer.from_pretrained(str(path / _TOKENIZER_OF[part])),
                   getattr(transformers, str(classes[part])).from_pretrained(str(path / part)))
            for part in found
        }  # fmt: skip
    else:  # a single-file checkpoint: the family that reads lone files loads it whole
        from ..models.custom_words import parts_of
        from ..models.family import load_with_family

        _, bundle = load_with_family(model)
        loaded = {part: (getattr(bundle, _TOKENIZER_OF[part]), bundle.part(part)) for part in parts_of(bundle)}
    return {part: (tok, enc.get_input_embeddings().weight.detach()) for part, (tok, enc) in loaded.items()}


def create_embedding(
    model: str,
    name: str,
    n_tokens: int,
    *,
    init_text: Optional[str] = None,
    out: str = "embs",
    fmt: str = "pt",
    seed: Optional[int] = None,
    force: bool = False,
) -> Tuple[Path, "torch.Tensor", List[str]]:
    """Create custom word ``name`` for ``model``; return (file written, vectors, notes).

    The vectors are a tensor ``[N, dim]``, or for a model with two CLIP text encoders (SDXL, SD3) a
    dict part -> tensor (``text_encoder``, ``text_encoder_2``).
    """
    import torch

    from ..models.custom_words import embedding_files, is_single_token, write_embedding

    _check_name(name)
    if n_tokens < 1:
        raise UserError(f"N_TOKENS must be at least 1, got {n_tokens}")
    if fmt not in ("pt", "safetensors"):
        raise UserError(f"--format must be pt or safetensors, got {fmt!r}")
    parts = parse_init_text(init_text) if init_text else []
    out_dir = Path(out)
    target = out_dir / f"{name}.{fmt}"
    if out_dir.is_dir() and not force:
        existing = [str(f) for n, files in embedding_files(out_dir).items() if n.lower() == name.lower() for f in files]
        if existing:
            raise UserError(f"custom word '{name}' already exists: {', '.join(existing)}; add --force to overwrite it")
    text_parts = _load_text_parts(model)
    for tokenizer, _ in text_parts.values():
        window = int(tokenizer.model_max_length) - 2  # BOS and EOS take two positions of the window
        if n_tokens > window:
            raise UserError(f"N_TOKENS = {n_tokens}: at most {window} vectors fit in {model}'s prompt window")
        if is_single_token(tokenizer, name):
            raise UserError(
                f"NAME '{name}' is already one token of {model}'s tokenizer; a custom word must be a new name "
                f"(e.g. '{name}-v1' or 'my-{name}') so prompts can still use the original word"
            )
    notes: List[str] = []
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        notes.append(f"random rows drawn with --seed {seed}")
    generator = torch.Generator().manual_seed(seed)
    per_part: Dict[str, "torch.Tensor"] = {}
    for part, (tokenizer, table) in text_parts.items():
        per_part[part], fit_notes = init_vectors(parts, n_tokens, tokenizer=tokenizer, table=table, generator=generator)
        notes += [note for note in fit_notes if note not in notes]  # SDXL: the same note for both encoders
    vectors: Any = next(iter(per_part.values())) if len(per_part) == 1 else per_part
    if force and out_dir.is_dir():  # a file of the word in the other format would keep the old vectors
        for f in (f for n, files in embedding_files(out_dir).items() if n.lower() == name.lower() for f in files):
            if f != target:
                f.unlink()
                notes.append(f"removed the word's old file {f}")
    write_embedding(target, name, vectors, step=0, model=Path(model).name)
    return target, vectors, notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcp tools create-embedding",
        description="Create a custom word (textual-inversion embedding) of N_TOKENS vectors for MODEL.",
        epilog="--init-text parts: plain words (the model's own token vectors) or *[std, len] (len random rows "
               "from N(0, std^2)), comma-separated, e.g. 'cat, *[0.01, 2], tail'. The result is cut to N_TOKENS, "
               "or padded at the end with random rows of the token table's std.",
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL", help="a diffusers folder or single-file checkpoint")
    p.add_argument("name", metavar="NAME", help="the word as prompts write it; also the file name")
    p.add_argument("n_tokens", metavar="N_TOKENS", type=int, help="token vectors (positions) the word takes")
    p.add_argument("--init-text", "--init_text", dest="init_text", default=None, metavar="TEXT", help="how the vectors start (see below)")
    p.add_argument("--out", "--root", dest="out", default="embs", metavar="DIR", help="folder to write to (default: embs)")
    p.add_argument("--format", dest="fmt", choices=("pt", "safetensors"), default="pt", help="file format (default: pt, A1111 layout)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random rows (default: random)")
    p.add_argument("--force", action="store_true", help="overwrite an existing word of that name")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; user errors propagate as :class:`UserError` for the CLI to print."""
    from ..models.custom_word_files import SDXL_FILE_KEYS

    args = build_parser().parse_args(argv)
    path, vectors, notes = create_embedding(args.model, args.name, args.n_tokens, init_text=args.init_text,
                                            out=args.out, fmt=args.fmt, seed=args.seed, force=args.force)  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    sets = vectors.items() if isinstance(vectors, dict) else [("", vectors)]
    shapes = " + ".join(f"{v.shape[0]} x {v.shape[1]}" + (f" ({SDXL_FILE_KEYS[part]})" if part else "") for part, v in sets)
    print(f"created custom word '{args.name}': {shapes} vectors in {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
