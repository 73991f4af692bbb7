"""Generation parameters in PNG text chunks.

Two chunks are written:

* ``parameters``: AUTOMATIC1111 webui's format, which image viewers and webui's "PNG Info" read::

      a photo of a cat
      Negative prompt: lowres
      Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1, Size: 512x512, Model: sd15, ...

  Values holding ``,``, ``:``, ``"`` or a line break are JSON-quoted, as webui does. hcp adds
  keys webui does not have (``Model path``, ``Lora``, ``Embeddings``); webui ignores unknown keys.
  ``Clip skip`` is webui's count (hcp's ``clip_skip`` + 1).
* ``hcp``: JSON of the exact :class:`GenerationParams` plus the device and precision, so nothing
  depends on parsing text (paths holding ``", "`` survive, floats keep every digit).

:func:`read_png_params` prefers the ``hcp`` chunk and falls back to ``parameters`` (an image from
webui, or one whose ``hcp`` chunk was stripped).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..errors import UserError
from ..fileio import atomic_write
from .params import GenerationParams, LoraSpec, parse_size
from .schedulers import UnknownSchedulerError, scheduler_choice, scheduler_from_webui_name

PARAMETERS_KEY = "parameters"
HCP_KEY = "hcp"
NEGATIVE_PREFIX = "Negative prompt:"
#: One ``Key: value`` of the parameters line; a value is JSON-quoted or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class MetadataError(UserError):
    """An image without readable generation parameters."""


# --------------------------------------------------------------------------- the parameters text
def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def model_name(model: str) -> str:
    """webui's ``Model`` value: the checkpoint file's stem, or the diffusers folder's name."""
    path = Path(model)
    return path.stem if path.suffix else path.name


def format_parameters(params: GenerationParams, extra: Optional[Mapping[str, Any]] = None) -> str:
    """The webui ``parameters`` text of ``params``; ``extra`` keys are appended before ``Version``."""
    from .. import __version__

    fields: Dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": scheduler_choice(params.scheduler).webui_name,
        "CFG scale": repr(float(params.cfg)),
        "Seed": params.seed,
        "Size": f"{params.width}x{params.height}",
    }
    if params.model:
        fields["Model"] = model_name(params.model)
        fields["Model path"] = params.model
    fields["Clip skip"] = params.clip_skip + 1
    if params.loras:
        fields["Lora"] = ", ".join(f"{spec.path}:{float(spec.weight)!r}" for spec in params.loras)
    if params.embeddings:
        fields["Embeddings"] = ", ".join(params.embeddings)
    if params.prediction_type:
        fields["Prediction type"] = params.prediction_type
    fields.update(extra or {})
    fields["Version"] = f"hcp {__version__}"
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _split_list(value: str) -> List[str]:
    return [item.strip() for item in value.split(", ") if item.strip()]


def parse_parameters(text: str) -> Dict[str, Any]:
    """The webui ``parameters`` text as a dict.

    Known keys get hcp names and types: ``prompt``, ``negative_prompt``, ``steps``, ``sampler``
    (webui's name) and ``scheduler`` (hcp's, when it has one), ``cfg``, ``seed``, ``width``,
    ``height``, ``model_name``, ``model`` (the path), ``clip_skip`` (hcp's count), ``loras``
    (:class:`LoraSpec` list), ``embeddings``, ``prediction_type``, ``version``. Other keys are kept
    as strings under their webui names ("Training step", "Hires upscale", ...).
    """
    lines = text.strip().split("\n")
    found = _PARAM.findall(lines[-1]) if lines else []
    raw: Dict[str, str] = {}
    if len(found) >= 3:  # a last line of at least three "Key: value" pairs holds the parameters
        raw = {key.strip(): _unquote(value) for key, value in found}
        lines = lines[:-1]
    prompt: List[str] = []
    negative: List[str] = []
    for line in lines:
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out: Dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    converters = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg", float),
        "Seed": ("seed", int),
        "Model": ("model_name", str),
        "Model path": ("model", str),
        "Clip skip": ("clip_skip", lambda v: int(v) - 1),
        "Prediction type": ("prediction_type", str),
        "Version": ("version", str),
    }
    for key, value in raw.items():
        try:
            if key in converters:
                name, convert = converters[key]
                out[name] = convert(value)
            elif key == "Sampler":
                out["sampler"] = value
                try:
                    out["scheduler"] = scheduler_from_webui_name(value).name
                except UnknownSchedulerError:
                    pass  # kept as "sampler"; a caller that needs a scheduler says so
            elif key == "Size":
                out["width"], out["height"] = parse_size(value)
            elif key == "Lora":
                out["loras"] = [_lora_item(item) for item in _split_list(value)]
            elif key == "Embeddings":
                out["embeddings"] = _split_list(value)
            else:
                out[key] = value
        except ValueError as exc:
            raise MetadataError(f"parameters: {key}: {value!r} is not valid ({exc})") from None
    return out


def _lora_item(item: str) -> LoraSpec:
    path, _, weight = item.rpartition(":")
    return LoraSpec(path, float(weight))


def params_from_parameters(text: str, scheduler: Optional[str] = None) -> GenerationParams:
    """:class:`GenerationParams` from webui ``parameters`` text (a missing ``Model path`` leaves ``model`` empty).

    ``scheduler`` replaces the text's sampler (needed when webui's has no equivalent here).
    """
    parsed = parse_parameters(text)
    if "seed" not in parsed:
        raise MetadataError("parameters: no Seed; the text is not in webui's format")
    if scheduler is not None:
        parsed["scheduler"] = scheduler
    elif "scheduler" not in parsed:
        sampler = parsed.get("sampler")
        if sampler is None:
            raise MetadataError("parameters: no Sampler; give --scheduler")
        scheduler_from_webui_name(sampler)  # raises, naming the known samplers
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg", "scheduler", "width", "height", "model",
            "clip_skip", "loras", "embeddings", "prediction_type")  # fmt: skip
    return GenerationParams(**{k: parsed[k] for k in keys if k in parsed})


# --------------------------------------------------------------------------- PNG files
def hcp_record(params: GenerationParams, *, device: str, dtype: str) -> Dict[str, Any]:
    """The ``hcp`` chunk's JSON object."""
    from .. import __version__

    return {"format": 1, "version": __version__, "device": device, "dtype": dtype, "params": params.to_json()}


def write_png(image: Any, path: str | os.PathLike, parameters: str, record: Optional[Mapping[str, Any]] = None) -> Path:
    """Save PIL ``image`` at ``path`` with the ``parameters`` text (and ``record`` as the ``hcp`` chunk).

    Written through :func:`~hcp_core.fileio.atomic_write`: a reader never sees half an image,
    and a full disk is a :class:`~hcp_core.fileio.FileWriteError` naming ``path``.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)  # non-Latin-1 text goes into an iTXt chunk
    if record is not None:
        info.add_text(HCP_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_text(path: str | os.PathLike) -> Dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of the PNG at ``path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    except (OSError, UnidentifiedImageError) as exc:
        raise MetadataError(f"cannot read the image {path}: {exc}") from None


def read_png_params(path: str | os.PathLike, scheduler: Optional[str] = None) -> GenerationParams:
    """The generation parameters stored in the PNG at ``path`` (``hcp`` chunk, else ``parameters``;
    ``scheduler``, when given, stands in for a webui sampler hcp does not have)."""
    text = read_png_text(path)
    if HCP_KEY in text:
        try:
            return GenerationParams.from_json(json.loads(text[HCP_KEY])["params"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(f"{path}: the hcp chunk is damaged ({exc})") from None
    if PARAMETERS_KEY in text:
        try:
            return params_from_parameters(text[PARAMETERS_KEY], scheduler)
        except MetadataError as exc:
            raise MetadataError(f"{path}: {exc}") from None
    raise MetadataError(f"{path} holds no generation parameters (no '{PARAMETERS_KEY}' or '{HCP_KEY}' text chunk)")

