"""``hcp generate``: images from a model, LoRA files and custom words, with their parameters inside.

The model loads through its family (``--family NAME``, or detected from the folder's
``model_index.json`` as for a pipeline's ``model.family``: :mod:`hcp_core.models.family`); the
family's prompt encoder and renderer make the images (SD/SDXL: :func:`~.render.render_image`).

For each prompt, ``n`` images; image ``i`` of a run (counted over all prompts: prompt ``j``,
repetition ``k`` is ``i = j * n + k``) uses seed ``seed + i``. Each PNG is written as
``OUT/<number>-<seed>.png``, numbered on from the highest number already in ``OUT``, with
:mod:`~hcp_core.generation.metadata` chunks that hold that image's own seed, so one image alone
reproduces it (``hcp generate --from-image IMG``).

LoRA files are folded into the weights (``W += weight * scale * up @ down``, in float32) before the
model is cast to the run's precision, each by the adapter that reads it (found through the plugin
registry, :mod:`hcp_core.adapter_files`); custom words are installed into the text encoder.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attrs

from ..data.size_checks import native_size
from ..errors import ConfigError, UserError
from ..registry import Registry
from .params import MAX_SEED, GenerationParams, LoraSpec, parse_size

log = logging.getLogger("hcp")

DTYPES = ("fp32", "fp16", "bf16")
_NUMBERED = re.compile(r"^(\d{5,})-")
#: Latents per side of a transformer whose config has no ``sample_size`` (diffusers' FLUX default:
#: 128 latents, 1024 pixels).
DEFAULT_LATENT_SIDE = 128


@attrs.frozen
class GenerateJob:
    """A validated ``hcp generate`` request. ``seed`` is the first image's seed."""

    model: str
    prompts: Tuple[str, ...]
    seed: int
    out: str
    negative_prompt: str = ""
    n: int = 1
    steps: int = 20
    cfg: float = 7.0
    scheduler: str = "ddim"
    size: Optional[Tuple[int, int]] = None  # None: the model's native size
    clip_skip: int = 0
    loras: Tuple[LoraSpec, ...] = ()
    embeddings: Tuple[str, ...] = ()
    prediction_type: Optional[str] = None
    model_config: Optional[str] = None  # a diffusers folder describing a single-file model
    device: Optional[str] = None  # None: cuda when available
    dtype: Optional[str] = None  # None: fp16 (SD, SDXL) or bf16 (other families) on cuda, fp32 on cpu
    family: Optional[str] = None  # None: detected from the model


def plan_images(job: GenerateJob, size: Tuple[int, int]) -> List[GenerationParams]:
    """One :class:`GenerationParams` per image, in order; image ``i`` has seed ``job.seed + i``."""
    width, height = size
    return [
        GenerationParams(
            prompt=prompt, seed=job.seed + j * job.n + k, model=job.model, negative_prompt=job.negative_prompt,
            steps=job.steps, cfg=job.cfg, scheduler=job.scheduler, width=width, height=height,
            clip_skip=job.clip_skip, loras=job.loras, embeddings=job.embeddings, prediction_type=job.prediction_type,
        )  # fmt: skip
        for j, prompt in enumerate(job.prompts)
        for k in range(job.n)
    ]


# --------------------------------------------------------------------------- from the command line
def job_from_args(args: Any) -> GenerateJob:
    """A :class:`GenerateJob` from ``hcp generate``'s parsed arguments (see ``hcp_core.cli``).

    Options left unset (None) come from ``--from-image`` when given, else from the defaults.
    Everything that can be checked without loading the model is checked here.
    """
    from .metadata import read_png_params
    from .schedulers import scheduler_choice

    base: Optional[GenerationParams] = read_png_params(args.from_image, args.scheduler) if args.from_image else None

    def pick(value: Any, attr: str, default: Any) -> Any:
        if value is not None:
            return value
        return getattr(base, attr) if base is not None else default

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        from .prompt_files import read_prompts

        prompts: Tuple[str, ...] = tuple(read_prompts(args.prompt_file))
    elif args.prompt is not None:
        prompts = (args.prompt,)
    elif base is not None:
        prompts = (base.prompt,)
    else:
        raise UserError("no prompt: give --prompt TEXT, --prompt-file FILE or --from-image IMAGE")
    model = pick(args.model, "model", "")
    if not model:
        raise UserError("no model: give --model (a diffusers folder or a .safetensors/.ckpt file)")
    scheduler = pick(args.scheduler, "scheduler", "ddim")
    scheduler_choice(scheduler)
    if args.size is not None:
        try:
            size: Optional[Tuple[int, int]] = parse_size(args.size)
        except ValueError as exc:
            raise UserError(f"--size: {exc}") from None
    else:
        size = (base.width, base.height) if base is not None else None
    seed = pick(args.seed, "seed", -1)
    if seed == -1:
        seed = random.SystemRandom().randrange(2**32)
    n = args.n if args.n is not None else 1
    steps = pick(args.steps, "steps", 20)
    clip_skip = pick(args.clip_skip, "clip_skip", 0)
    for name, value, low in (("-n", n, 1), ("--steps", steps, 1), ("--clip-skip", clip_skip, 0), ("--seed", seed, 0)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}" + (" (-1: a random seed)" if name == "--seed" else ""))
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise UserError(f"--seed {seed} is too large: image seeds must stay below 2**64")
    loras = tuple(args.lora) if args.lora is not None else (base.loras if base is not None else ())
    for spec in loras:
        if not Path(spec.path).is_file():
            raise UserError(f"--lora: LoRA file {spec.path} not found")
    embeddings = tuple(args.embeddings) if args.embeddings is not None else (base.embeddings if base is not None else ())
    for folder in embeddings:
        if not Path(folder).is_dir():
            raise UserError(f"--embeddings: folder {folder} not found (a folder of custom word .pt/.safetensors files)")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r}: use one of {', '.join(DTYPES)}")
    return GenerateJob(
        model=_absolute(model), prompts=prompts, seed=seed, out=args.out,
        negative_prompt=pick(args.negative_prompt, "negative_prompt", ""), n=n, steps=steps,
        cfg=pick(args.cfg, "cfg", 7.0), scheduler=scheduler, size=size, clip_skip=clip_skip,
        loras=tuple(LoraSpec(_absolute(s.path), s.weight) for s in loras),
        embeddings=tuple(_absolute(e) for e in embeddings),
        prediction_type=pick(args.prediction_type, "prediction_type", None),
        model_config=args.model_config, device=args.device, dtype=args.dtype,
        family=getattr(args, "family", None),
    )  # fmt: skip


def _absolute(path: str) -> str:
    """Absolute paths in the metadata keep an image reproducible from any working directory."""
    return str(Path(path).expanduser().resolve())


# --------------------------------------------------------------------------- running
@attrs.define
class LoadedModel:
    """A model ready to render: weights with LoRA merged, the prompt encoder, where it runs."""

    models: Any  # ModelBundle
    encoder: Any  # the family's prompt encoder (an SD/SDXL PromptEncoder, possibly wrapped for custom words)
    device: str
    dtype: str
    #: The model family (``ModelFamily``) that loaded it and renders it; None renders with the
    #: family of ``models.kind`` (:func:`~hcp_core.generation.render.render_image`).
    family: Any = None

    def native_size(self) -> Tuple[int, int]:
        """The denoiser's trained resolution in pixels: its ``sample_size`` latents (the UNet's;
        a transformer without one: 128, diffusers' FLUX default) times the latent factor."""
        factor = self.latent_factor()
        return native_size(self.models, factor) or (DEFAULT_LATENT_SIDE * factor, DEFAULT_LATENT_SIDE * factor)

    def latent_factor(self) -> int:
        if self.family is not None:
            return int(self.family.latent_factor(self.models))
        return 2 ** (len(self.models.vae.config.block_out_channels) - 1)

    def size_multiple(self) -> int:
        """What image sides must be multiples of (the family's ``size_multiple``, or its latent factor)."""
        multiple = getattr(self.family, "size_multiple", None)
        return int(multiple(self.models)) if multiple is not None else self.latent_factor()

    def render(self, params: GenerationParams) -> Any:
        """The PIL image ``params`` describe, by the family's renderer."""
        if self.family is None:
            from .render import render_image

            return render_image(self.models, self.encoder, params)
        return self.family.render(self.models, self.encoder, params, autocast=contextlib.nullcontext)


def load_for_generation(
    model: str,
    *,
    loras: Sequence[LoraSpec] = (),
    embeddings: Sequence[str] = (),
    clip_skip: int = 0,
    prediction_type: Optional[str] = None,
    model_config: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    log_fn: Callable[[str], None] = log.info,
    registry: Optional[Registry] = None,
    family: Optional[str] = None,
) -> LoadedModel:
    """Load ``model`` through its family (``family`` names it; detected otherwise), merge ``loras``
    into it, install the custom words of ``embeddings`` (SD/SDXL only), cast to ``dtype`` and move
    it to ``device``.

    Each LoRA file is merged by the adapter of ``registry`` (default: the process-wide one) that
    reads it; a file no adapter reads is a :class:`UserError` before the model loads.
    """
    import torch

    from ..adapter_files import find_file_adapter
    from ..models.family import build_family, family_component
    from ..plugins import get_registry

    registry = registry if registry is not None else get_registry()
    appliers = [(find_file_adapter(registry, spec.path), spec) for spec in loras]
    component = family_component(model, registry=registry, family=family, config=model_config)
    fam = build_family(component)
    if embeddings and not getattr(fam, "custom_words", False):  # optional family member
        raise UserError(f"--embeddings: custom words are not supported in hcp generate for {component.name} models; "
                        "leave --embeddings out.")  # fmt: skip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:  # bf16 where the GPU has it (T5 overflows in fp16), fp32 on CPU
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.startswith("cuda") else "fp32"
    bundle = fam.load(model, prediction_type=prediction_type, config=model_config)
    clip_skip_problem = getattr(fam, "clip_skip_problem", None)  # optional family member
    problem = clip_skip_problem(bundle, clip_skip) if clip_skip_problem is not None else None
    if problem is not None:
        raise UserError(f"--clip-skip {clip_skip} is out of range: {problem}")
    try:
        encoder = fam.prompt_encoder(bundle, clip_skip=clip_skip)
    except ConfigError as exc:
        if not clip_skip:
            raise
        raise UserError(f"--clip-skip {clip_skip}: this {component.name} model has no CLIP skip; leave --clip-skip "
                        f"out or set it to 0 ({exc})") from None  # fmt: skip
    for adapter, spec in appliers:  # merged in float32, before any cast; SDXL files hold unet, te1 and te2 keys
        count = adapter.apply(bundle, spec.path, spec.weight)
        log_fn(f"merged {spec.path} with weight {spec.weight:g} into {count} layers")
    encoder = with_custom_words(bundle, encoder, embeddings, log_fn)
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for part in bundle.modules().values():  # the denoiser, every text encoder, the VAE
        if part is bundle.vae and vae_stays_fp32(bundle, target, fam):
            part.to(torch.device(device)).eval()
            continue
        if part.dtype != target:
            # nn.Module's own .to: diffusers' override warns about fp32 modules on every cast, even with none.
            torch.nn.Module.to(part, dtype=target)
        part.to(torch.device(device))
        part.eval()
    return LoadedModel(models=bundle, encoder=encoder, device=device, dtype=dtype, family=fam)


def vae_stays_fp32(bundle: Any, target: Any, family: Any) -> bool:
    """Whether an fp16 run keeps the VAE in fp32: when the family's optional
    ``vae_upcast_in_fp16(models)`` says so (SDXL, whose VAE overflows in fp16).

    diffusers' pipeline would cast such a VAE to fp32 and back for every image; keeping it in fp32
    decodes the same way once and for all (the renderer hands it its latents in fp32).
    """
    import torch

    upcast = getattr(family, "vae_upcast_in_fp16", None)  # optional family member
    return target == torch.float16 and upcast is not None and bool(upcast(bundle))


def with_custom_words(bundle: Any, encoder: Any, embeddings: Sequence[str], log_fn: Callable[[str], None]) -> Any:
    """``encoder``, or a wrapper of it that knows the custom words of the ``embeddings`` folders
    (installed into ``bundle``'s text encoder; a word in a later folder overrides an earlier one)."""
    from ..models.custom_words import EmbeddingFileError, install_word_sets, load_word_sets, parts_of, wrap_for_words

    words = {}
    try:
        for folder in embeddings:
            words.update(load_word_sets(folder, parts_of(bundle)))  # the CLIP encoders the model has
        if not words:
            return encoder
        encoder = wrap_for_words(encoder, install_word_sets(bundle, words))
    except EmbeddingFileError as exc:
        raise UserError(f"--embeddings: {exc}") from None
    log_fn(f"custom words: {', '.join(words)}")
    return encoder


def next_number(out: Path) -> int:
    """The number after the highest ``NNNNN-*.png`` in ``out`` (0 for a new folder)."""
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := _NUMBERED.match(p.name))] if out.is_dir() else []
    return max(numbers) + 1 if numbers else 0


def generate(job: GenerateJob, log_fn: Callable[[str], None] = print, registry: Optional[Registry] = None) -> List[Path]:
    """Render every image of ``job`` into ``job.out``; return the files written, in order.

    ``registry`` finds the adapter of each LoRA file (default: the process-wide one)."""
    from .metadata import format_parameters, hcp_record, write_png

    loaded = load_for_generation(
        job.model, loras=job.loras, embeddings=job.embeddings, clip_skip=job.clip_skip,
        prediction_type=job.prediction_type, model_config=job.model_config, device=job.device, dtype=job.dtype,
        log_fn=log_fn, registry=registry, family=job.family,
    )  # fmt: skip
    size = job.size or loaded.native_size()
    multiple = loaded.size_multiple()
    if size[0] % multiple or size[1] % multiple:
        raise UserError(f"--size {size[0]}x{size[1]}: this {loaded.models.kind} model renders sizes whose sides are "
                        f"multiples of {multiple}")  # fmt: skip
    plans = plan_images(job, size)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    first = next_number(out)
    written: List[Path] = []
    for i, params in enumerate(plans):
        image = loaded.render(params)
        path = write_png(image, out / f"{first + i:05d}-{params.seed}.png", format_parameters(params),
                         hcp_record(params, device=loaded.device, dtype=loaded.dtype))  # fmt: skip
        written.append(path)
        log_fn(f"{i + 1}/{len(plans)}: {path}")
    return written
