"""The ``hcp`` command. Start-up imports no torch: each command imports what it needs."""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

from .errors import RunStopped, UserError

EPILOG = "Docs: README.md. A user error exits with status 2; add --debug for a traceback."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="PIPELINE.toml", help="pipeline TOML file")
    # default=[]: without it argparse lists KEY=VALUE among the "required" arguments when none is given.
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. data.dataset1.batch_size=2 or lora_unet[0].rank=8 (also after options)")


def _load(args: argparse.Namespace):
    from .config import load_config
    from .plugins import get_registry, report_failures

    report_failures(get_registry())  # a broken plugin is named, the rest go on
    return load_config(args.config, args.overrides)


def _resume_arg(args: argparse.Namespace) -> None:
    # `--resume` takes an optional path; an override typed right after it is not a path.
    if args.resume and "=" in args.resume and args.resume != "latest":
        args.overrides.append(args.resume)
        args.resume = "latest"


def cmd_run(args: argparse.Namespace) -> int:
    _resume_arg(args)
    pipeline = _load(args)
    from .train.runner import run

    run(pipeline, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import pipeline_to_dict
    from .config.toml_write import dumps

    print(dumps(pipeline_to_dict(_load(args))), end="")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    _resume_arg(args)
    pipeline = _load(args)
    if args.resume:
        from .train.checkpoint import resolve_resume

        resolve_resume(pipeline.exp_dir, args.resume)
    print(f"config OK: {args.config}")
    from .train.preflight import check_pipeline

    ok = check_pipeline(pipeline, out=sys.stdout)
    return 0 if ok else 2


def cmd_plugins(args: argparse.Namespace) -> int:
    from .config.component_options import component_lines
    from .plugins import get_registry, plugin_listing

    print("\n".join(plugin_listing(get_registry(), component_lines if args.verbose else None)))
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import os

    from .models.layers_listing import list_model, write_listing
    from .plugins import get_registry, report_failures

    registry = get_registry()
    report_failures(registry)
    listings = list_model(args.model, registry=registry, family=args.family, config=args.model_config,
                          parts=args.part or (), pattern=args.pattern, defaults_only=args.defaults)
    try:
        write_listing(listings, sys.stdout)
    except BrokenPipeError:  # `hcp layers M | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")
    return 0


def version_text() -> str:
    """``hcp --version``: hcp's version, then those of the libraries that decide model behaviour."""
    import importlib.metadata as md
    import platform

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{d} {version(d)}" for d in ("torch", "diffusers", "transformers", "accelerate"))
    return f"hcp {version('hcp')}\n{libraries}, python {platform.python_version()}"


class _VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but the text is computed only when asked for."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        print(version_text())
        parser.exit()


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo.dataset import build_demo_dataset

    root = Path(args.dir)
    family = "sdxl" if args.sdxl else args.family
    builders = {  # module, function, folder
        "sd": ("hcp_core.demo.model", "build_demo_model", "model"),
        "sdxl": ("hcp_core.demo.sdxl", "build_demo_sdxl_model", "model-sdxl"),
        "sd3": ("hcp_core.demo.sd3", "build_demo_sd3_model", "model-sd3"),
        "flux": ("hcp_core.demo.flux", "build_demo_flux_model", "model-flux"),
    }
    import importlib

    module, function, folder = builders[family]
    model = getattr(importlib.import_module(module), function)(root / folder)
    data = build_demo_dataset(root / "data")
    print(f"demo model: {model}\ndemo data:  {data}")
    return 0


def cmd_tool(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(TOOLS[args.tool][0])
    return int(module.main(args.tool_args) or 0)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation.generate import generate, job_from_args

    written = generate(job_from_args(args))
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


#: ``hcp tools NAME``: module with ``main(argv) -> int`` and a one-line help.
TOOLS: Dict[str, tuple[str, str]] = {
    "convert-captions": ("hcp_core.tools.convert_captions", "turn per-image .txt captions into one .json"),
    "merge-lora": ("hcp_core.tools.merge_lora", "merge LoRA files into a model's weights"),
    "create-embedding": ("hcp_core.tools.create_embedding", "create a custom word (textual-inversion embedding) for prompt tuning"),
    "gen-from-prompts": ("hcp_core.tools.gen_from_prompts", "generate regularization images with captions from a prompt database"),
    "convert-config": ("hcp_core.tools.convert_config", "turn an HCP-Diffusion training YAML into an hcp pipeline TOML"),
}


def _lora_arg(text: str):
    from .generation.params import LoraSpecError, parse_lora_spec

    try:
        return parse_lora_spec(text)
    except LoraSpecError as exc:  # argparse shows its own message, not "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scheduler_names() -> List[str]:
    from .generation.schedulers import SCHEDULERS

    return list(SCHEDULERS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcp", description="Fine-tune diffusion models from TOML pipelines.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print hcp's version and its libraries'")
    # --debug is accepted after the command too; SUPPRESS keeps a leading one from being reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("run", help="train a pipeline", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in exp_dir, or from the given one")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an exp_dir that holds another run, moving that run to <exp_dir>.old-<time>")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the merged, resolved pipeline as TOML")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("check", help="validate a pipeline and its data without training")
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="also check that this checkpoint (default: the latest in exp_dir) exists")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="generate images (LoRA, custom words, CLIP skip); parameters go into each PNG",
                       epilog="Image i of a run uses seed SEED + i (counted over all prompts). " + EPILOG)
    p.add_argument("--model", default=None, help="a diffusers folder or a single .safetensors/.ckpt file")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="a local diffusers folder describing a single-file --model (to load it offline)")
    p.add_argument("--family", default=None, metavar="NAME",
                   help="the model family (sd, sdxl, flux, ...; see `hcp plugins`); default: detected from the model")
    p.add_argument("--lora", action="append", type=_lora_arg, default=None, metavar="FILE[:WEIGHT]",
                   help="merge a LoRA file with WEIGHT (default 1); repeatable")
    p.add_argument("--embeddings", action="append", default=None, metavar="DIR",
                   help="a folder of custom words (.pt/.safetensors) usable in prompts; repeatable, later ones win")
    p.add_argument("--prompt", "-p", default=None, help="the prompt")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help=".txt (one prompt a line) or .parquet prompts")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt (default: none)")
    p.add_argument("-n", type=int, default=None, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; -1 (default) picks one at random")
    p.add_argument("--size", default=None, metavar="WxH", help="e.g. 512x768 (default: the model's native size)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="sampler (default ddim): " + ", ".join(_scheduler_names()))
    p.add_argument("--clip-skip", type=int, default=None, help="0 (default) = no skip, webui's 'clip skip 1'")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override the model's scheduler config")
    p.add_argument("--from-image", default=None, metavar="PNG",
                   help="take every option not given here from an image's metadata (hcp or webui)")
    p.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default bf16 on GPUs that support it (else fp16), fp32 on cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plugins", help="list loaded plugins and their components")
    p.add_argument("-v", "--verbose", action="store_true", help="also show each component's config keys, types and defaults")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("layers", help="list a model's module names for layers = [...], default LoRA targets marked",
                       epilog="Reads only the model's configs (no weights). " + EPILOG)
    p.add_argument("model", help="a diffusers folder (or a single file with --model-config)")
    p.add_argument("pattern", nargs="?", default=None,
                   help="show what this layers pattern selects (a module name or 're:' + regex); "
                        "a word that names no module filters names containing it")
    p.add_argument("--part", action="append", default=None, metavar="PART",
                   help="only this model part (unet, transformer, text_encoder, ...); repeatable")
    p.add_argument("--defaults", action="store_true", help="only the family's default LoRA targets")
    p.add_argument("--family", default=None, metavar="NAME", help="the model family; default: detected from the model")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="a local diffusers folder describing a single-file MODEL")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("demo", help="create the tiny offline demo model and dataset")
    p.add_argument("dir", nargs="?", default="demo", help="output folder (default: ./demo)")
    p.add_argument("--family", default="sd", choices=("sd", "sdxl", "sd3", "flux"),
                   help="which tiny model: sd -> DIR/model (default), sdxl -> DIR/model-sdxl, sd3 -> DIR/model-sd3, "
                        "flux -> DIR/model-flux")
    p.add_argument("--sdxl", action="store_true", help="the same as --family sdxl")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tools", help="helper tools; 'hcp tools NAME --help' for each")
    p.add_argument("tool", choices=sorted(TOOLS), metavar="NAME",
                   help="; ".join(f"{k}: {v[1]}" for k, v in sorted(TOOLS.items())))
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    p.set_defaults(func=cmd_tool)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hcp`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow options (`hcp run p.toml --resume seed=3`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"hcp: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"hcp: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hcp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
