"""``hcp tools convert-captions DATA_ROOT``: per-image ``.txt`` captions -> one ``image_captions.json``.

Keys are the images' paths relative to DATA_ROOT (``"a.png"``, ``"sub/b.jpg"``), exactly what
the ``image_folder`` source matches, so the written file is picked up as the folder's caption
file without further configuration. (The original tool keyed captions in a way the loader could
not match for images in sub-folders.)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.captions import DEFAULT_CAPTION_FILE, read_caption_txt
from ..data.files import list_files
from ..data.images import is_image_name
from ..errors import DataError, UserError

USAGE = """usage: hcp tools convert-captions DATA_ROOT [--out FILE] [--recursive]

Collect the .txt caption beside each image under DATA_ROOT into one JSON file
(default DATA_ROOT/image_captions.json), keyed by the image path relative to DATA_ROOT.
--recursive also collects images in sub-folders (use it with image_folder's recursive = true).
The image_folder data source reads that file automatically."""
MAX_LISTED = 20  # images without a caption listed by main()


def collect_captions(data_root: str | os.PathLike, recursive: bool = False) -> Tuple[Dict[str, str], List[str]]:
    """(relative image path -> caption, images that have no .txt) for the images under ``data_root``."""
    root = str(data_root)
    if not os.path.isdir(root):
        raise DataError(f"convert-captions: {root} is not a folder")
    captions: Dict[str, str] = {}
    missing: List[str] = []
    for rel in list_files(root, recursive):
        if not is_image_name(rel):
            continue
        txt = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
        if os.path.isfile(txt):
            captions[rel] = read_caption_txt(txt)[0]
        else:
            missing.append(rel)
    return captions, missing


def write_caption_file(captions: Dict[str, str], data_root: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Write ``captions`` as sorted JSON to ``out`` (default ``DATA_ROOT/image_captions.json``)."""
    if not captions:
        raise DataError(f"convert-captions: no image under {data_root} has a .txt caption beside it")
    target = Path(out) if out is not None else Path(data_root) / DEFAULT_CAPTION_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(dict(sorted(captions.items())), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def convert_captions(data_root: str | os.PathLike, out: Optional[str | os.PathLike] = None, *, recursive: bool = False) -> Path:
    """Write the captions of ``data_root`` as JSON to ``out`` (default ``DATA_ROOT/image_captions.json``).

    Returns the written path. Raises :class:`DataError` if the folder does not exist or has no
    captioned image.
    """
    captions, _missing = collect_captions(data_root, recursive)
    return write_caption_file(captions, data_root, out)


def _parse(argv: Sequence[str]) -> Tuple[str, Optional[str], bool]:
    root: Optional[str] = None
    out: Optional[str] = None
    recursive = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--out":
            if not args:
                raise UserError("convert-captions: --out needs a file name\n" + USAGE)
            out = args.pop(0)
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        elif arg == "--recursive":
            recursive = True
        elif arg.startswith("-"):
            raise UserError(f"convert-captions: unknown option {arg!r}\n" + USAGE)
        elif root is None:
            root = arg
        else:
            raise UserError(f"convert-captions: one DATA_ROOT expected, got {root!r} and {arg!r}\n" + USAGE)
    if root is None:
        raise UserError("convert-captions: DATA_ROOT is missing\n" + USAGE)
    return root, out, recursive


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: ``hcp tools convert-captions DATA_ROOT [--out FILE] [--recursive]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    root, out, recursive = _parse(argv)
    captions, missing = collect_captions(root, recursive)
    path = write_caption_file(captions, root, out)
    print(f"wrote {len(captions)} caption(s) to {path}")
    if missing:
        print(f"{len(missing)} image(s) have no .txt caption and are not in the file:")
        for rel in missing[:MAX_LISTED]:
            print(f"  {os.path.join(root, rel)}")
        if len(missing) > MAX_LISTED:
            print(f"  ... and {len(missing) - MAX_LISTED} more")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
