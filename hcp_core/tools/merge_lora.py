"""``hcp tools merge-lora``: fold LoRA files into a model and write it as a new diffusers folder.

The model loads through its model family (``--family``, or detected from ``model_index.json``:
SD 1.x/2.x, SDXL, FLUX, any plugin family). The output folder is a copy of the input in which the
parts the LoRA files changed (the UNet or transformer, text encoders; a UNet and CLIP text
encoders always) are written again, each tensor in the type the input stored it in and, for a
large part, in shards with an index as diffusers and transformers write them. CLIP text encoders are written with the standard
``text_model.``-prefixed keys, which transformers 4 and 5, webui and ComfyUI all read
(transformers 5's own ``save_pretrained`` leaves the prefix out, and transformers 4 then silently
starts from random weights); other parts keep the input files' key names. Optionally one
original-layout single-file checkpoint is written too (SD 1.x and SDXL only).

Each ``--lora`` file is merged by the adapter that reads it, found through the plugin registry
(:mod:`hcp_core.adapter_files`): the built-in LoRA (and DoRA), LyCORIS (LoHa, LoKr), or any
plugin adapter that declares file capabilities.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..generation.params import parse_lora_spec
from ..models.module_names import canonical_state_dict
from ..registry import Registry

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")


#: Shards of a rewritten part are at most this large (transformers' default; diffusers reads them too).
SHARD_BYTES = 5 * 1024**3
#: Parts merge-lora writes again when a LoRA file changed them (the VAE never changes).
MERGE_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _stored_dtypes(part_dir: Path) -> Dict[str, "object"]:
    """Tensor name -> torch dtype of every tensor in a part folder's ``.safetensors`` files."""
    import torch
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out: Dict[str, object] = {}
    for file in sorted(part_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = names.get(f.get_slice(key).get_dtype(), torch.float32)
    return out


def _stored_dtype(part_dir: Path):
    """The tensor type of the first weight in a part folder (merged weights are saved back in it)."""
    import torch

    return next(iter(_stored_dtypes(part_dir).values()), torch.float32)


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _clear_weights(part_dir: Path) -> None:
    for file in part_dir.iterdir():
        if file.is_file() and _is_weight_file(file.name):
            file.unlink()


def _signature(module) -> tuple:
    """What changes when a tensor of ``module`` is written to in place or replaced."""
    return tuple((name, id(t), t._version, t.data_ptr()) for name, t in module.state_dict(keep_vars=True).items())


def _part_state(part: str, module, stored: Dict[str, object]) -> Dict[str, "object"]:
    """The tensors to write for ``part``: under canonical names (``text_model.*`` for CLIP); the
    input's own key set when it holds a subset of them (tied weights stored once, as the input did);
    otherwise every tensor, one name per storage."""
    state = canonical_state_dict(part, module)
    if stored and set(stored) <= set(state):
        return {key: state[key] for key in stored}
    out, seen = {}, set()
    for key, value in state.items():
        ptr = (value.device, value.data_ptr()) if value.numel() else None
        if ptr is not None and ptr in seen:
            continue  # a tied weight: safetensors stores each storage once
        seen.add(ptr)
        out[key] = value
    return out


def write_part(module, part: str, part_dir: Path, stored: Dict[str, object], *, shard_bytes: int = SHARD_BYTES) -> List[Path]:
    """Write ``module``'s weights into ``part_dir`` as diffusers (``diffusion_pytorch_model``) or
    transformers (``model``) safetensors, each tensor in its ``stored`` type (others: the first
    stored type, or float32); sharded with an ``.index.json`` when larger than ``shard_bytes``."""
    import json

    import torch
    from safetensors.torch import save_file

    from ..fileio import atomic_write

    state = _part_state(part, module, stored)
    default = next(iter(stored.values()), torch.float32)
    dtypes = {k: (stored.get(k, default) if v.is_floating_point() else v.dtype) for k, v in state.items()}
    stem = "diffusion_pytorch_model" if _is_diffusers_model(module) else "model"
    shards: List[List[str]] = [[]]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * torch.empty((), dtype=dtypes[key]).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])  # fmt: skip
    written = []
    for name, keys in zip(names, shards):
        cpu = {k: state[k].detach().to("cpu", dtypes[k]).contiguous() for k in keys}
        written.append(atomic_write(part_dir / name, lambda tmp, cpu=cpu: save_file(cpu, tmp, metadata={"format": "pt"})))
        del cpu
    if len(shards) > 1:
        total = sum(state[k].numel() * torch.empty((), dtype=dtypes[k]).element_size() for k in state)
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        written.append(atomic_write(part_dir / f"{stem}.safetensors.index.json",
                                    lambda tmp: Path(tmp).write_text(text, encoding="utf-8")))
    return written


def _is_diffusers_model(module) -> bool:
    from diffusers import ModelMixin

    return isinstance(module, ModelMixin)


def merge_lora(
    model: str | Path,
    loras: Sequence[Tuple[str, float]],
    out: str | Path,
    single_file: Optional[str | Path] = None,
    *,
    registry: Optional[Registry] = None,
    family: Optional[str] = None,
) -> Path:
    """Merge ``loras`` ((path, weight) pairs) into the diffusers folder ``model``; write ``out``.

    Returns the output folder. ``single_file`` also writes an original-layout ``.safetensors``
    (SD 1.x and SDXL). The model loads through its family (``family`` names it; detected from the
    folder otherwise). Each file is merged by the adapter of ``registry`` (default: the
    process-wide one) that reads it.
    """
    from ..adapter_files import find_file_adapter
    from ..models.family import build_family, family_component
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

    # Every file is matched to its adapter, and the model to its family, before the (slow) model load.
    appliers = [(find_file_adapter(registry, path), path, weight) for path, weight in loras]
    component = family_component(str(src), registry=registry, family=family)
    fam = build_family(component)
    if single_file is not None and getattr(fam, "write_single_file", None) is None:  # optional family member
        raise UserError(f"--single-file: {component.name} models have no single-file layout in hcp; leave "
                        "--single-file out: the merged diffusers folder is complete.")
    models = fam.load(str(src))
    modules = {part: getattr(models, part) for part in MERGE_PARTS if getattr(models, part, None) is not None}
    before = {part: _signature(module) for part, module in modules.items()}
    for adapter, path, weight in appliers:
        adapter.apply(models, str(path), weight)
    # Written again: every part a file changed, and always a UNet and the CLIP text encoders (cheap;
    # their files then have the standard names whatever the input used, as hcp always wrote them).
    changed = [part for part, module in modules.items()
               if _signature(module) != before[part] or part == "unet" or type(module).__name__.startswith("CLIPTextModel")]
    missing = [part for part in changed if not (src / part).is_dir()]
    if missing:
        raise UserError(f"--model {src}: the LoRA changed the {', '.join(missing)}, which has no folder in the model")

    stored = {part: _stored_dtypes(src / part) for part in changed}
    rewritten = {(src / part).resolve() for part in changed}

    def skip_old_weights(folder: str, names: List[str]) -> List[str]:
        return [n for n in names if Path(folder).resolve() in rewritten and _is_weight_file(n)]

    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=skip_old_weights)
    for part in changed:
        _clear_weights(dst / part)
        write_part(modules[part], part, dst / part, stored[part])

    if single_file is not None:
        write_single_file(models, Path(single_file), _stored_dtype(src / "unet"), family=fam)
    return dst


def write_single_file(models, path: Path, dtype, *, family: Any = None) -> Path:
    """Write ``models`` as one original-layout checkpoint at ``path`` (SD 1.x, SDXL) by its family's
    optional ``write_single_file`` (``family``: by default the one registered under
    ``models.kind``), after its optional ``single_file_problem`` found nothing against it."""
    from ..models.family import family_of

    fam = family if family is not None else family_of(models)
    writer = getattr(fam, "write_single_file", None)  # optional family members
    check = getattr(fam, "single_file_problem", None)
    problem = check(models) if check is not None else None
    if writer is None:
        problem = f"{models.kind} models have no single-file layout in hcp; the diffusers folder is complete"
    if problem is not None:
        raise UserError(f"--single-file: {problem}.")
    if path.suffix != ".safetensors":
        raise UserError(f"--single-file {path}: give a .safetensors path")
    return writer(models, path, dtype)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``hcp tools merge-lora``."""
    parser = argparse.ArgumentParser(
        prog="hcp tools merge-lora",
        description="Merge LoRA files into a model's weights and save the result as a diffusers folder.",
    )
    parser.add_argument("--model", required=True, help="the base model: a diffusers folder (SD, SDXL, FLUX, ...)")
    parser.add_argument("--family", default=None, metavar="NAME",
                        help="the model family (sd, sdxl, flux, ...); default: detected from model_index.json")
    parser.add_argument(
        "--lora", required=True, action="append", metavar="FILE[:WEIGHT]",
        help="a LoRA, DoRA, LoHa or LoKr .safetensors (kohya, PEFT or LyCORIS layout), optionally with a weight "
             "(default 1.0); repeat for several",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="the new diffusers folder (must not exist or be empty)")
    parser.add_argument("--single-file", help="also write one original-layout .safetensors checkpoint (SD 1.x, SDXL)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; user errors propagate as :class:`UserError` for the CLI to print."""
    args = build_parser().parse_args(argv)
    loras = [(spec.path, spec.weight) for spec in map(parse_lora_spec, args.lora)]
    out = merge_lora(args.model, loras, args.out, args.single_file, family=args.family)
    merged = ", ".join(f"{path} x {weight:g}" for path, weight in loras)
    print(f"merged {merged} into {out}" + (f" and {args.single_file}" if args.single_file else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
