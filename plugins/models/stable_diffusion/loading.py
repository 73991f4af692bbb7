"""Load a Stable Diffusion checkpoint from local files into a :class:`ModelBundle`.

Two forms are read, never downloaded:

* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), each part loaded with its own class' ``from_pretrained``; an SDXL folder
  (``text_encoder_2/`` with a projection, ``tokenizer_2/``) loads as ``kind = "sdxl"``;
* a single ``.safetensors`` / ``.ckpt`` file, through diffusers' ``from_single_file``, which works
  offline only when the model's configs and tokenizer are on disk (``config=`` a diffusers folder
  of the same architecture, or the Hugging Face cache).

The scheduler in the bundle is a ``DDPMScheduler`` built from the model's scheduler config: the
noise schedule training needs, whatever sampler the model ships with. Samplers can be made from
its config (``EulerDiscreteScheduler.from_config(bundle.scheduler.config)``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from hcp_core.interfaces import ModelBundle
from hcp_core.models.loading import (
    SINGLE_FILE_SUFFIXES,
    ModelLoadError,
    missing_model_message,
    skeleton_part,
    weights_variant,
)
from hcp_core.models.pipelines import pipeline_class, quiet_progress_bars

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: diffusers' pipeline class of each model kind.
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")
_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
           "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip


def load_models(
    pretrained: Union[str, Path],
    *,
    prediction_type: Optional[str] = None,
    dtype: Any = None,
    frozen: bool = True,
    config: Optional[Union[str, Path]] = None,
) -> ModelBundle:
    """Load the SD model at ``pretrained`` (a diffusers folder or a single checkpoint file).

    ``prediction_type`` ("epsilon" | "v_prediction") overrides the scheduler config's and is written
    into the scheduler config, so both agree. ``dtype`` is a ``torch.dtype`` or a name ("fp16",
    "bf16", "fp32"); None keeps the stored precision of each part as loaded (float32 for diffusers
    and transformers defaults). With ``frozen`` (the default) every part is in eval mode with
    ``requires_grad`` off; adapters switch on what they train. ``config`` is a local diffusers
    folder that describes a single-file checkpoint (ignored for folders).
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"model.prediction_type = {prediction_type!r} is not known; use one of "
            + ", ".join(repr(p) for p in PREDICTION_TYPES[:2])
            + " or leave it out to use the scheduler config's"
        )
    quiet_progress_bars()
    torch_dtype = _torch_dtype(dtype)
    path = Path(pretrained).expanduser()
    if not path.exists():
        raise ModelLoadError(missing_model_message(str(pretrained)))
    if path.is_dir():
        parts = _load_folder(path, prediction_type)
    else:
        parts = _load_single_file(path, prediction_type, config)

    scheduler = parts["scheduler"]
    bundle = ModelBundle(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler=scheduler,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        kind="sdxl" if parts.get("text_encoder_2") is not None else "sd",
        source=str(path),
        prediction_type=scheduler.config.prediction_type,
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(bundle, name)
        if module is None:
            continue
        if torch_dtype is not None:
            module.to(dtype=torch_dtype)
        if frozen:
            module.requires_grad_(False)
            module.eval()
    return bundle


# --------------------------------------------------------------------------- diffusers folders
def _load_folder(path: Path, prediction_type: Optional[str]) -> Dict[str, Any]:
    """Load each part of a diffusers SD or SDXL folder with its own class."""
    classes = _folder_classes(path)
    extra: Dict[str, Dict[str, Any]] = {
        name: {"variant": weights_variant(path / name)}
        for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in classes
    }
    extra["scheduler"] = {"prediction_type": prediction_type} if prediction_type else {}
    parts = {}
    for part, cls in classes.items():
        try:
            parts[part] = cls.from_pretrained(str(path / part), local_files_only=True, **extra.get(part, {}))
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # corrupt or incomplete part
            raise _part_error(path, part, err) from err
    return parts


def _part_error(path: Path, part: str, err: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the {part} of '{path}' from '{path / part}': {err}. "
        f"The {part}/ folder may be incomplete; copy it again from the model's source."
    )


def _folder_classes(path: Path) -> Dict[str, Any]:
    """Part name -> the class that loads it, for the diffusers folder ``path`` (checked complete)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _read_model_index(path)
    sdxl = is_sdxl_index(index)
    for part in SDXL_PARTS if sdxl else SD_PARTS:
        _check_part(path, part, index)
    # DDPM whatever sampler the folder ships: config keys meant for other samplers are dropped quietly.
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer, "scheduler": DDPMScheduler}  # fmt: skip
    if sdxl:  # SDXL's second encoder has the projection its pooled text embedding needs
        classes.update(text_encoder_2=CLIPTextModelWithProjection, tokenizer_2=CLIPTokenizer)
    return classes


def load_model_skeleton(
    pretrained: Union[str, Path],
    *,
    prediction_type: Optional[str] = None,
    config: Optional[Union[str, Path]] = None,
) -> Optional[ModelBundle]:
    """The model at ``pretrained`` built from its configs on the ``meta`` device: every layer,
    name and shape, but no weight read (``hcp check`` selects layers on it in a second).

    Tokenizers and the scheduler are real (small files). A single-file checkpoint is described by
    its ``config`` folder; without one, None (its architecture is only known by reading it).
    Errors are the :class:`ModelLoadError` that :func:`load_models` would raise for the same
    missing folder or broken config.
    """
    path = Path(pretrained).expanduser()
    if not path.exists():
        raise ModelLoadError(missing_model_message(str(pretrained)))
    if not path.is_dir():
        if config is None:
            return None
        if not (Path(config) / "model_index.json").is_file():
            raise ModelLoadError(f"config '{config}' for '{path}' is not a diffusers folder (no model_index.json).")
        path = Path(config)
    parts: Dict[str, Any] = {}
    for part, cls in _folder_classes(path).items():
        try:
            parts[part] = skeleton_part(cls, path / part, part, prediction_type=prediction_type)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise _part_error(path, part, err) from err
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].requires_grad_(False)
            parts[name].eval()
    return ModelBundle(
        unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"], text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
        kind="sdxl" if "text_encoder_2" in parts else "sd", source=str(Path(pretrained)),
        prediction_type=parts["scheduler"].config.prediction_type,
    )


def is_sdxl_index(index: Dict[str, Any]) -> bool:
    """True for the ``model_index.json`` of an SDXL pipeline (it lists a second text encoder)."""
    entry = index.get("text_encoder_2")
    return bool(entry and entry[0] is not None) or str(index.get("_class_name", "")).startswith("StableDiffusionXL")


def _read_model_index(path: Path) -> Dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        nested = sorted(p.parent for p in path.glob("*/model_index.json"))
        hint = f" Did you mean '{nested[0]}'?" if nested else ""
        raise ModelLoadError(
            f"'{path}' is not a diffusers model folder: it has no model_index.json. Point model.pretrained "
            "at the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and "
            f"scheduler/, or at a single .safetensors/.ckpt file.{hint}"
        )
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"'{index_file}' is not valid JSON ({err}); copy it again from the model's source.") from err


def _check_part(path: Path, part: str, index: Dict[str, Any]) -> None:
    entry = index.get(part)
    if not entry or entry[0] is None:
        raise ModelLoadError(
            f"'{path / 'model_index.json'}' lists no {part}; hcp needs a full Stable Diffusion model "
            f"({', '.join(SDXL_PARTS if is_sdxl_index(index) else SD_PARTS)})."
        )
    if not (path / part).is_dir():
        raise ModelLoadError(
            f"'{path}' has no {part}/ folder although model_index.json names it; the download is "
            f"incomplete: copy the {part}/ folder from the model's source into '{path}'."
        )


# --------------------------------------------------------------------------- single files
def _load_single_file(path: Path, prediction_type: Optional[str], config: Optional[Union[str, Path]]) -> Dict[str, Any]:
    """Read a single checkpoint file through diffusers, offline (an SDXL one with the SDXL pipeline)."""
    from diffusers import DDPMScheduler

    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"'{path}' is neither a diffusers folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}); "
            "point model.pretrained at one of those."
        )
    kwargs: Dict[str, Any] = {"local_files_only": True}
    sdxl = _is_sdxl_checkpoint(path)
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise ModelLoadError(f"config '{config}' for '{path}' is not a diffusers folder (no model_index.json).")
        kwargs["config"] = str(config)
        sdxl = sdxl or is_sdxl_index(_read_model_index(Path(config)))
    if not sdxl:
        kwargs.update(safety_checker=None, feature_extractor=None)
    try:
        pipe = pipeline_class(PIPELINE_CLASSES["sdxl" if sdxl else "sd"]).from_single_file(str(path), **kwargs)
    except Exception as err:  # diffusers raises many types here (OSError, ValueError, hub errors)
        raise ModelLoadError(
            f"diffusers could not read the single-file checkpoint '{path}' offline "
            f"({type(err).__name__}: {str(err).strip().rstrip('.')}). It needs the model's configs and "
            "tokenizer on disk: convert the checkpoint to a diffusers folder where they are available "
            "and set model.pretrained to that folder, or give load_models(config=...) a local diffusers "
            "folder of the same architecture."
        ) from err
    scheduler_kwargs = {"prediction_type": prediction_type} if prediction_type else {}
    parts = {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": DDPMScheduler.from_config(pipe.scheduler.config, **scheduler_kwargs),
    }
    if sdxl:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    _check_all_weights_read(path, parts)
    return parts


def _check_all_weights_read(path: Path, parts: Dict[str, Any]) -> None:
    """Refuse a model with weights the file did not hold.

    diffusers builds text encoders on the meta device and fills in what the file has; a weight the
    file lacks stays an empty meta tensor without a word (and training would fail far from here).
    """
    for name, module in parts.items():
        if not hasattr(module, "named_parameters"):  # tokenizers, scheduler
            continue
        tensors = [*module.named_parameters(), *module.named_buffers()]
        missing = [key for key, tensor in tensors if tensor.is_meta]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ModelLoadError(
                f"the single-file checkpoint '{path}' lacks {len(missing)} of the {len(tensors)} weights of the "
                f"{name} ({shown}): the file is incomplete, or its layout is not one diffusers reads (an SDXL file "
                "whose two text encoders have the same width is one). Use the model's diffusers folder instead."
            )


def _is_sdxl_checkpoint(path: Path) -> bool:
    """True for a .safetensors checkpoint in SDXL's layout (its second text encoder's keys)."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(key.startswith("conditioner.embedders.1.") for key in f.keys())
    except Exception:  # not a readable safetensors file: let diffusers report it
        return False


# --------------------------------------------------------------------------- helpers
def _torch_dtype(dtype: Any):
    """``None`` or a torch dtype, from a torch dtype or a name like "fp16"."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ModelLoadError(f"dtype {dtype!r} is not known; use one of 'fp32', 'fp16', 'bf16'.")
    return getattr(torch, name)
