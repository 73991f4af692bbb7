"""The typed shape of a pipeline. Key names follow the original guide (seed, model.clip_skip,
data.<dataset>.batch_size, [[unet]], [[lora_unet]], [tokenizer_pt], ...).

Adapter sections ([[unet]], [[lora_unet]], [tokenizer_pt], ...) are not fields here: adapters
claim them at registration, so a plugin can add its own section.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs

from ..registry import BucketSpec, LossSpec, SourceSpec

MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _one_of(options: Tuple[str, ...]):
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, got {value!r}", attribute)

    return check


def _at_least(low: float):
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value < low:
            raise ValueError(f"must be at least {low}, got {value!r}", attribute)

    return check


@attrs.define
class ModelConfig:
    """``[model]``: which checkpoint, and how it runs."""

    pretrained: str
    #: For a single-file checkpoint: a local diffusers folder of the same architecture whose
    #: configs and tokenizer describe it (diffusers needs them to read the file offline).
    config: Optional[str] = None
    clip_skip: int = attrs.field(default=0, validator=_at_least(0))
    mixed_precision: str = attrs.field(default="no", validator=_one_of(MIXED_PRECISION))
    gradient_checkpointing: bool = False
    #: Override the scheduler config's prediction type ("epsilon" | "v_prediction").
    prediction_type: Optional[str] = attrs.field(default=None, validator=_one_of(PREDICTION_TYPES))
    #: Keep the VAE in fp32 under fp16/bf16 (the SDXL VAE overflows in fp16).
    vae_fp32: bool = True


@attrs.define
class OptimizerConfig:
    """``train.optimizer``: a registry name (never an import path) and its options."""

    type: str = "adamw"
    weight_decay: float = 1e-2
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only


@attrs.define
class SchedulerConfig:
    """``train.scheduler``: learning-rate schedule by name."""

    type: str = "constant"
    warmup_steps: int = attrs.field(default=0, validator=_at_least(0))
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak lr


@attrs.define
class EmaConfig:
    """``train.ema``: exponential moving average of the trained weights."""

    enabled: bool = False
    decay: float = 0.999


def _default_loss() -> Any:
    return None  # filled with the registered "mse" loss when the pipeline is structured


@attrs.define
class TrainConfig:
    """``[train]``: the loop's hyper-parameters."""

    max_steps: int = attrs.field(default=1000, validator=_at_least(1))
    gradient_accumulation: int = attrs.field(default=1, validator=_at_least(1))
    max_grad_norm: Optional[float] = 1.0
    save_every: int = attrs.field(default=0, validator=_at_least(0))  # 0: only at the end
    log_every: int = attrs.field(default=10, validator=_at_least(1))
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    loss: Optional[LossSpec] = None  # None means the registered "mse"
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    ema: EmaConfig = attrs.field(factory=EmaConfig)
    keep_checkpoints: int = attrs.field(default=2, validator=_at_least(1))


@attrs.define
class DatasetConfig:
    """``[data.<name>]``: one of the parallel datasets; each step draws one batch from each."""

    sources: List[SourceSpec]
    bucket: BucketSpec
    batch_size: int = attrs.field(default=1, validator=_at_least(1))
    loss_weight: float = 1.0
    cache_latents: bool = False
    num_workers: int = attrs.field(default=0, validator=_at_least(0))
    #: Where cached latents live; default ``<exp_dir>/latent_cache``.
    cache_dir: Optional[str] = None
    #: Colour transparent images (RGBA, LA, paletted with transparency) are composited on.
    background: str = attrs.field(default="white")

    @background.validator
    def _check_background(self, attribute: attrs.Attribute, value: str) -> None:
        from ..data.images import parse_colour  # imports PIL only when a config is checked

        try:
            parse_colour(value)
        except ValueError as exc:
            raise ValueError(str(exc), attribute) from None


def _sample_size(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    from ..generation.params import parse_size

    try:
        parse_size(value)
    except ValueError as exc:
        raise ValueError(str(exc), attribute) from None


def _sample_scheduler(inst: Any, attribute: attrs.Attribute, value: str) -> None:
    from ..generation.schedulers import UnknownSchedulerError, scheduler_choice

    try:
        scheduler_choice(value, where=None)
    except UnknownSchedulerError as exc:
        raise ValueError(str(exc), attribute) from None


def _sample_prompts(inst: "SampleConfig", attribute: attrs.Attribute, value: List[str]) -> None:
    from ..data.prompts import fill_placeholders, placeholders

    if not value:
        raise ValueError("list at least one prompt, e.g. prompts = [\"a photo of a cat\"]", attribute)
    for i, prompt in enumerate(value):
        left = placeholders(fill_placeholders(prompt, inst.word_names))
        if left:
            raise ValueError(f"prompt {i} ({prompt!r}) has {{{left[0]}}} but word_names does not fill it; "
                             f"add word_names = {{ {left[0]} = \"my-word\" }}", attribute)


@attrs.define
class SampleConfig:
    """``[sample]``: images rendered with the model being trained (docs/generation.md).

    Prompt ``k`` uses seed ``seed + k``. ``word_names`` fills ``{name}`` placeholders in the
    prompts (as ``template_fill`` does for training prompts); custom words, LoRA and the model's
    clip_skip apply as in training. ``every`` = 0 samples only at the end of the run.
    """

    prompts: List[str] = attrs.field(factory=list, validator=_sample_prompts)
    negative_prompt: str = ""
    word_names: Dict[str, str] = attrs.field(factory=dict)
    every: int = attrs.field(default=0, validator=_at_least(0))
    seed: int = attrs.field(default=0, validator=_at_least(0))
    steps: int = attrs.field(default=20, validator=_at_least(1))
    #: "WxH" or [W, H]; None: the first bucket of the first dataset.
    size: Any = attrs.field(default=None, validator=_sample_size)
    scheduler: str = attrs.field(default="ddim", validator=_sample_scheduler)
    cfg: float = 7.0

    def resolution(self, default: Tuple[int, int]) -> Tuple[int, int]:
        """``(width, height)`` to sample at; ``default`` when ``size`` is not set."""
        from ..generation.params import parse_size

        return default if self.size is None else parse_size(self.size)


@attrs.define
class Pipeline:
    """A whole pipeline after merging bases and overrides."""

    model: ModelConfig
    data: Dict[str, DatasetConfig]
    seed: int = 0
    exp_dir: str = "runs/exp"
    train: TrainConfig = attrs.field(factory=TrainConfig)
    sample: Optional[SampleConfig] = None
    #: Adapter sections, structured by the adapters that claim them:
    #: section name -> list of that adapter's config objects.
    adapters: Dict[str, List[Any]] = attrs.field(factory=dict)
    #: Adapter options tables (e.g. ``[lora]``), structured: section name -> config object.
    adapter_options: Dict[str, Any] = attrs.field(factory=dict)
    #: Directory relative paths in the pipeline resolve against (the working directory at load).
    base_dir: str = "."
    #: The merged raw TOML tables (what ``hcp config`` prints).
    raw: Dict[str, Any] = attrs.field(factory=dict, repr=False)
    #: The registry this pipeline was validated against; the run builds every component
    #: (adapters included) from it, never from a process-wide one.
    registry: Any = attrs.field(default=None, repr=False, eq=False)
