"""``hcp tools merge-lora``: fold LoRA files into a model and write it as a new diffusers folder.

The output folder is a copy of the input with the merged UNet and text encoder weights (both of
SDXL's encoders); text encoders are written with the standard ``text_model.``-prefixed keys, which
transformers 4 and 5, webui and ComfyUI all read (transformers 5's own ``save_pretrained`` leaves
the prefix out, and transformers 4 then silently starts from random weights). Optionally one
original-layout single-file checkpoint is written too (SD 1.x and SDXL).

Each ``--lora`` file is merged by the adapter that reads it, found through the plugin registry
(:mod:`hcp_core.adapter_files`): the built-in LoRA, or any plugin adapter that declares file
capabilities.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..generation.params import parse_lora_spec
from ..models.module_names import canonical_state_dict
from ..registry import Registry

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")


def _stored_dtype(part_dir: Path):
    """The tensor type of the first weight in a part folder (merged weights are saved back in it)."""
    import torch
    from safetensors import safe_open

    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for file in sorted(part_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                return names.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def text_encoder_state(text_encoder) -> Dict[str, "object"]:
    """The text encoder's weights under standard (transformers 4, webui) names: ``text_model.*``."""
    return canonical_state_dict("text_encoder", text_encoder)


def _clear_weights(part_dir: Path) -> None:
    for file in part_dir.iterdir():
        if file.is_file() and (file.name.endswith(WEIGHT_SUFFIXES) or file.name.endswith(".index.json")):
            file.unlink()


def _save(tensors: Dict[str, "object"], path: Path, dtype) -> None:
    from safetensors.torch import save_file

    from ..fileio import atomic_write

    cpu = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))


def merge_lora(
    model: str | Path,
    loras: Sequence[Tuple[str, float]],
    out: str | Path,
    single_file: Optional[str | Path] = None,
    *,
    registry: Optional[Registry] = None,
) -> Path:
    """Merge ``loras`` ((path, weight) pairs) into the diffusers folder ``model``; write ``out``.

    Returns the output folder. ``single_file`` also writes an original-layout ``.safetensors``.
    Each file is merged by the adapter of ``registry`` (default: the process-wide one) that reads it.
    """
    from ..adapter_files import find_file_adapter
    from ..models.loading import load_models
    from ..plugins import get_registry

    registry = registry if registry is not None else get_registry()

    src, dst = Path(model), Path(out)
    if not (src / "model_index.json").is_file():
        raise UserError(f"--model {src}: not a diffusers model folder (no model_index.json)")
    if not loras:
        raise UserError("name at least one --lora FILE[:WEIGHT]")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"--out {dst} exists and is not empty; choose a new folder")
    if dst.resolve() == src.resolve():
        raise UserError("--out must differ from --model")

    # Every file is matched to its adapter before the (slow) model load.
    appliers = [(find_file_adapter(registry, path), path, weight) for path, weight in loras]
    models = load_models(str(src))
    for adapter, path, weight in appliers:
        adapter.apply(models, str(path), weight)

    shutil.copytree(src, dst, dirs_exist_ok=True)
    unet_dtype = _stored_dtype(src / "unet")
    _clear_weights(dst / "unet")
    _save(models.unet.state_dict(), dst / "unet" / "diffusion_pytorch_model.safetensors", unet_dtype)
    for part in ("text_encoder", "text_encoder_2"):
        encoder = getattr(models, part)
        if encoder is None:
            continue
        te_dtype = _stored_dtype(src / part)
        _clear_weights(dst / part)
        _save(text_encoder_state(encoder), dst / part / "model.safetensors", te_dtype)

    if single_file is not None:
        write_single_file(models, Path(single_file), unet_dtype)
    return dst


def write_single_file(models, path: Path, dtype) -> Path:
    """Write ``models`` (SD 1.x or SDXL) as one original-layout checkpoint at ``path``."""
    from .ldm_checkpoint import ldm_state_dict

    # SD 2.x keeps an OpenCLIP text encoder (1024 wide, plain gelu) under another key layout.
    te_config = models.text_encoder.config
    sd2 = models.kind == "sd" and (te_config.hidden_size == 1024 or te_config.hidden_act == "gelu")
    if sd2 or models.kind not in ("sd", "sdxl"):
        raise UserError(
            "--single-file: only SD 1.x (OpenAI CLIP text encoder) and SDXL models can be written as one file so "
            "far; use the diffusers folder for this model."
        )
    if path.suffix != ".safetensors":
        raise UserError(f"--single-file {path}: give a .safetensors path")
    state = ldm_state_dict(
        models.unet.state_dict(), dict(models.unet.config),
        models.vae.state_dict(), dict(models.vae.config),
        text_encoder_state(models.text_encoder),
        text_encoder_state(models.text_encoder_2) if models.kind == "sdxl" else None,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(state, path, dtype)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``hcp tools merge-lora``."""
    parser = argparse.ArgumentParser(
        prog="hcp tools merge-lora",
        description="Merge LoRA files into a model's weights and save the result as a diffusers folder.",
    )
    parser.add_argument("--model", required=True, help="the base model: a diffusers folder")
    parser.add_argument(
        "--lora", required=True, action="append", metavar="FILE[:WEIGHT]",
        help="a LoRA .safetensors (kohya or PEFT layout), optionally with a weight (default 1.0); repeat for several",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="the new diffusers folder (must not exist or be empty)")
    parser.add_argument("--single-file", help="also write one original-layout .safetensors checkpoint (SD 1.x, SDXL)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; user errors propagate as :class:`UserError` for the CLI to print."""
    args = build_parser().parse_args(argv)
    loras = [(spec.path, spec.weight) for spec in map(parse_lora_spec, args.lora)]
    out = merge_lora(args.model, loras, args.out, args.single_file)
    merged = ", ".join(f"{path} x {weight:g}" for path, weight in loras)
    print(f"merged {merged} into {out}" + (f" and {args.single_file}" if args.single_file else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
