"""``image_folder``: images under ``img_root``, with captions, prompt templates and attention masks.

The scan reads file headers only (sizes for bucketing), never pixels. Everything it cannot use
becomes a :class:`~hcp_core.interfaces.Problem` naming the file and what hcp did about it. The
checks every source gets (unfilled template placeholders, missing captions, masks that do not fit
their image) run in the core after the scan (:func:`hcp_core.data.prepare.check_records`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hcp_core.data.captions import DEFAULT_CAPTION_FILE, load_caption_file, match_captions, read_caption_txt
from hcp_core.data.files import folder_problem, list_files
from hcp_core.data.images import BadImage, Header, is_image_name, read_header
from hcp_core.data.prompts import TemplateFill
from hcp_core.errors import DataError
from hcp_core.interfaces import ImageRecord, Problem, ScanResult, SourceContext

from .config import ImageFolderConfig

_HEADER_THREADS = 4  # more threads only fight over the GIL


def _stem(rel: str) -> str:
    return os.path.splitext(rel)[0]


def _headers(paths: Sequence[str], max_pixels: Optional[int]) -> List[Tuple[Optional[Header], Optional[str]]]:
    """(header, None) or (None, reason) per path.

    Large folders are read by a few threads, each taking a contiguous run of files: header
    parsing holds the GIL, but the threads overlap the waits on the disk.
    """

    def one(path: str) -> Tuple[Optional[Header], Optional[str]]:
        try:
            return read_header(path, max_pixels), None
        except BadImage as exc:
            return None, str(exc)
        except OSError as exc:  # unreadable file (permissions, vanished)
            return None, f"cannot read file ({exc})"

    def run(chunk: Sequence[str]) -> List[Tuple[Optional[Header], Optional[str]]]:
        return [one(p) for p in chunk]

    threads = max(1, min(_HEADER_THREADS, os.cpu_count() or 1))
    if len(paths) < 2048 or threads == 1:
        return run(paths)
    parts = threads * 4
    chunks = [paths[i * len(paths) // parts : (i + 1) * len(paths) // parts] for i in range(parts)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [h for chunk in pool.map(run, chunks) for h in chunk]


class ImageFolderSource:
    """Scans one folder; built by the registry as ``factory(config, context=...)``."""

    def __init__(self, config: ImageFolderConfig, *, context: SourceContext) -> None:
        self.config = config
        self.context = context
        self.where = f"data.{context.dataset}.sources (image_folder {config.img_root!r})"
        self.root = self._resolve_dir(config.img_root, "img_root", None)
        self.mask_dir = self._resolve_dir(config.att_mask, "att_mask", self.root) if config.att_mask else None
        self.caption_file = self._find_caption_file()
        self.templates = self._load_templates()
        transforms = [spec.build() for spec in config.text_transforms]
        if config.word_names:
            # The source's own word_names fill whatever the listed transforms left.
            transforms.append(TemplateFill(config.word_names))
        self.transforms = tuple(transforms)

    # ------------------------------------------------------------------ config paths
    def _candidates(self, value: str, fallback_root: Optional[str]) -> List[str]:
        if os.path.isabs(value):
            return [value]
        out = [os.path.join(self.context.base_dir, value)]
        if fallback_root is not None:
            out.append(os.path.join(fallback_root, value))
        return out

    def _resolve_dir(self, value: str, key: str, fallback_root: Optional[str]) -> str:
        for path in self._candidates(value, fallback_root):
            if os.path.isdir(path):
                return os.path.abspath(path)
        tried = " or ".join(self._candidates(value, fallback_root))
        reason = folder_problem(self._candidates(value, fallback_root)[0]) or "does not exist"
        raise DataError(f"{self.where}: {key} folder {value!r} {reason} (looked for {tried})")

    def _resolve_file(self, value: str) -> Optional[str]:
        for path in self._candidates(value, self.root):
            if os.path.isfile(path):
                return os.path.abspath(path)
        return None

    def _find_caption_file(self) -> Optional[str]:
        value = self.config.caption_file
        if value is None:
            default = os.path.join(self.root, DEFAULT_CAPTION_FILE)
            return default if os.path.isfile(default) else None
        path = self._resolve_file(value)
        if path is None:
            raise DataError(f"{self.where}: caption_file {value!r} not found")
        return path

    def _load_templates(self) -> Tuple[str, ...]:
        value = self.config.prompt_template
        path = self._resolve_file(value) if "\n" not in value else None
        if path is None:
            if value.lower().endswith(".txt"):
                raise DataError(f"{self.where}: prompt_template file {value!r} not found")
            return (value,)
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
        templates = tuple(line for line in lines if line)
        if not templates:
            raise DataError(f"{self.where}: prompt_template file {path} has no templates (one per line)")
        return templates

    # ------------------------------------------------------------------ scan
    def scan(self) -> ScanResult:
        """Find the usable images and every problem with the folder's files."""
        cfg = self.config
        problems: List[Problem] = []
        own_files = {p for p in (self.caption_file, self._resolve_file(cfg.prompt_template)) if p}
        images: List[str] = []
        txts: Dict[str, str] = {}
        for rel in list_files(self.root, cfg.recursive, [self.mask_dir] if self.mask_dir else [], problems):
            path = os.path.join(self.root, rel)
            if path in own_files:  # root is absolute and normalised, so is path
                continue
            if is_image_name(rel):
                images.append(rel)
            elif rel.lower().endswith(".txt"):
                txts[_stem(rel)] = path
            else:
                problems.append(Problem(path, f"not an image file (type {Path(rel).suffix or 'none'!r})", "ignored"))

        captions, caption_problems = self._captions(images, txts)
        problems += caption_problems
        masks, mask_problems = self._mask_index(images)
        problems += mask_problems

        headers = _headers([os.path.join(self.root, rel) for rel in images], cfg.max_image_pixels)
        records: List[ImageRecord] = []
        for rel, (header, reason) in zip(images, headers):
            path = os.path.join(self.root, rel)
            if header is None:
                problems.append(Problem(path, reason or "unreadable image", "skipped"))
                continue
            records.append(
                ImageRecord(
                    image=path,
                    size=header.size,
                    caption=captions.get(rel),
                    mask=masks.get(rel),
                    templates=self.templates,
                    text_transforms=self.transforms,
                    repeat=cfg.repeat,
                    source=f"image_folder {cfg.img_root}",
                )
            )
        return ScanResult(records=records, problems=problems)

    def _captions(self, images: List[str], txts: Dict[str, str]) -> Tuple[Dict[str, str], List[Problem]]:
        """Caption per image (relative path); the caption file wins over a .txt beside the image."""
        problems: List[Problem] = []
        captions: Dict[str, str] = {}
        if self.caption_file is not None:
            mapping, problems = load_caption_file(self.caption_file)
            captions, unmatched = match_captions(mapping, images)
            problems += [Problem(self.caption_file, f"caption for {key!r} matches no image", "ignored") for key in unmatched]
        stems = {_stem(rel) for rel in images}
        for stem, path in txts.items():
            if stem not in stems:
                problems.append(Problem(path, "caption with no image", "ignored"))
        for rel in images:
            txt = txts.get(_stem(rel))
            if rel not in captions and txt is not None:
                try:
                    captions[rel], problem = read_caption_txt(txt)
                except OSError as exc:
                    problems.append(Problem(txt, f"caption cannot be read ({exc})", "ignored"))
                    continue
                if problem is not None:
                    problems.append(problem)
        return captions, problems

    def _mask_index(self, images: List[str]) -> Tuple[Dict[str, str], List[Problem]]:
        """Mask path per image: same relative stem in the mask folder, else the same bare stem."""
        if self.mask_dir is None:
            return {}, []
        by_rel_stem: Dict[str, str] = {}
        by_stem: Dict[str, str] = {}
        problems: List[Problem] = []
        for rel in list_files(self.mask_dir, True, problems=problems):
            path = os.path.join(self.mask_dir, rel)
            if not is_image_name(rel):
                problems.append(Problem(path, "not an image file in the mask folder", "ignored"))
                continue
            by_rel_stem.setdefault(_stem(rel), path)
            by_stem.setdefault(_stem(rel).rsplit("/", 1)[-1], path)
        masks: Dict[str, str] = {}
        for rel in images:
            found = by_rel_stem.get(_stem(rel)) or by_stem.get(_stem(rel).rsplit("/", 1)[-1])
            if found is not None:
                masks[rel] = found
        used = set(masks.values())
        problems += [Problem(p, "mask with no image", "ignored") for p in sorted(set(by_rel_stem.values()) - used)]
        return masks, problems
