"""The typed shape of a pipeline. Key names follow the original guide (seed, model.clip_skip,
data.<dataset>.batch_size, [[unet]], [[lora_unet]], [tokenizer_pt], ...).

Adapter sections ([[unet]], [[lora_unet]], [tokenizer_pt], ...) are not fields here: adapters
claim them at registration, so a plugin can add its own section.

Every number has a range (docs/training.md, "Value ranges"): a value that would corrupt or crash
a run (NaN, a negative learning rate, a decay of 5, a seed numpy refuses) or make it allocate
absurdly (a batch of 2**63) is refused here, so ``hcp check`` reports it as ``hcp run`` would.
This module imports nothing from data/ or generation/: config is the core's lowest layer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs

from ..registry import BucketSpec, LossSpec, ModelFamilySpec, SourceSpec
from .validators import at_least, each, fail, greater_than, in_range, not_blank, one_of, seed_in_range
from .values import MAX_SIDE, fill_placeholders, parse_colour, parse_size, placeholders, unknown_scheduler

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Upper bounds that only refuse absurd values (each far beyond any real run).
MAX_STEPS = 100_000_000
MAX_GRADIENT_ACCUMULATION = 4096
MAX_BATCH_SIZE = 4096
MAX_NUM_WORKERS = 1024
#: diffusers' samplers refuse more steps than the model's 1000 training timesteps.
MAX_SAMPLE_STEPS = 1000
MAX_CFG = 100.0

#: A fraction in [0, 1): EMA decay, Adam's betas, SGD momentum (1 or more never forgets / diverges).
_unit_open = in_range(0, 1, high_open=True)


@attrs.define
class ModelConfig:
    """``[model]``: which checkpoint, and how it runs."""

    pretrained: str = attrs.field(validator=not_blank)
    #: For a single-file checkpoint: a local diffusers folder of the same architecture whose
    #: configs and tokenizer describe it (diffusers needs them to read the file offline).
    config: Optional[str] = attrs.field(default=None, validator=not_blank)
    clip_skip: int = attrs.field(default=0, validator=at_least(0))  # its upper bound depends on the model
    #: "auto": bf16 on CUDA GPUs that have it, fp16 on older ones, fp32 on CPU (hcp_core/train/precision.py).
    mixed_precision: str = attrs.field(default="auto", validator=one_of(MIXED_PRECISION))
    gradient_checkpointing: bool = False
    #: Override the scheduler config's prediction type ("epsilon" | "v_prediction").
    prediction_type: Optional[str] = attrs.field(default=None, validator=one_of(PREDICTION_TYPES))
    #: Keep the VAE in fp32 under fp16/bf16 (the SDXL VAE overflows in fp16).
    vae_fp32: bool = True
    #: The model family (``"sd"``, ``"sdxl"``, a plugin's): a name or ``{ type = "...", ... }``
    #: with the family's options. Left out, it is detected from the model folder.
    family: Optional[ModelFamilySpec] = None
    #: Encode every (fixed) prompt once before training and move the text encoders off the GPU
    #: (families whose prompt outputs have a fixed shape: FLUX, SD3; see docs/training.md).
    cache_text: bool = False


@attrs.define
class OptimizerConfig:
    """``train.optimizer``: a registry name (never an import path) and its options."""

    type: str = "adamw"
    weight_decay: float = attrs.field(default=1e-2, validator=at_least(0))
    betas: Tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=each(_unit_open))
    eps: float = attrs.field(default=1e-8, validator=in_range(0, 1, low_open=True))  # 0 divides by zero
    momentum: float = attrs.field(default=0.0, validator=_unit_open)  # sgd only


@attrs.define
class SchedulerConfig:
    """``train.scheduler``: learning-rate schedule by name."""

    type: str = "constant"
    warmup_steps: int = attrs.field(default=0, validator=at_least(0))
    #: Cosine/linear floor, as a fraction of the peak lr.
    min_lr_ratio: float = attrs.field(default=0.0, validator=in_range(0, 1))


@attrs.define
class EmaConfig:
    """``train.ema``: exponential moving average of the trained weights."""

    enabled: bool = False
    decay: float = attrs.field(default=0.999, validator=_unit_open)


def _default_loss() -> Any:
    return None  # filled with the registered "mse" loss when the pipeline is structured


@attrs.define
class TrainConfig:
    """``[train]``: the loop's hyper-parameters."""

    max_steps: int = attrs.field(default=1000, validator=in_range(1, MAX_STEPS))
    gradient_accumulation: int = attrs.field(default=1, validator=in_range(1, MAX_GRADIENT_ACCUMULATION))
    #: Gradient clipping norm; 0 or unset: no clipping.
    max_grad_norm: Optional[float] = attrs.field(default=1.0, validator=at_least(0))
    save_every: int = attrs.field(default=0, validator=at_least(0))  # 0: only at the end
    log_every: int = attrs.field(default=10, validator=at_least(1))
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    loss: Optional[LossSpec] = None  # None means the registered "mse"
    #: Min-SNR weighting; 0 would weigh every loss to zero.
    min_snr_gamma: Optional[float] = attrs.field(default=None, validator=greater_than(0))
    noise_offset: float = attrs.field(default=0.0, validator=in_range(0, 1))
    ema: EmaConfig = attrs.field(factory=EmaConfig)
    keep_checkpoints: int = attrs.field(default=2, validator=at_least(1))


@attrs.define
class DatasetConfig:
    """``[data.<name>]``: one of the parallel datasets; each step draws one batch from each."""

    sources: List[SourceSpec]
    bucket: BucketSpec
    batch_size: int = attrs.field(default=1, validator=in_range(1, MAX_BATCH_SIZE))
    #: This dataset's share of the loss; 0 trains nothing on it, NaN would poison every step.
    loss_weight: float = attrs.field(default=1.0, validator=at_least(0))
    cache_latents: bool = False
    #: DataLoader worker processes (the run also caps them to the CPU count).
    num_workers: int = attrs.field(default=0, validator=in_range(0, MAX_NUM_WORKERS))
    #: Where cached latents live; default ``<exp_dir>/latent_cache``.
    cache_dir: Optional[str] = attrs.field(default=None, validator=not_blank)
    #: Colour transparent images (RGBA, LA, paletted with transparency) are composited on.
    background: str = attrs.field(default="white")

    @background.validator
    def _check_background(self, attribute: attrs.Attribute, value: str) -> None:
        try:
            parse_colour(value)  # imports PIL only when a config is checked
        except ValueError as exc:
            fail(attribute, str(exc))


def _sample_size(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    try:
        width, height = parse_size(value)
    except ValueError as exc:
        fail(attribute, str(exc))
    if max(width, height) > MAX_SIDE:
        fail(attribute, f"size {width}x{height}: width and height must be at most {MAX_SIDE}")


def _sample_scheduler(inst: Any, attribute: attrs.Attribute, value: str) -> None:
    problem = unknown_scheduler(value)
    if problem is not None:
        fail(attribute, problem)


def _sample_prompts(inst: "SampleConfig", attribute: attrs.Attribute, value: List[str]) -> None:
    if not value:
        fail(attribute, "list at least one prompt, e.g. prompts = [\"a photo of a cat\"]")
    for i, prompt in enumerate(value):
        left = placeholders(fill_placeholders(prompt, inst.word_names))
        if left:
            fail(attribute, f"prompt {i} ({prompt!r}) has {{{left[0]}}} but word_names does not fill it; "
                            f"add word_names = {{ {left[0]} = \"my-word\" }}")


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
    every: int = attrs.field(default=0, validator=at_least(0))
    seed: int = attrs.field(default=0, validator=seed_in_range)
    steps: int = attrs.field(default=20, validator=in_range(1, MAX_SAMPLE_STEPS))
    #: "WxH" or [W, H]; None: the first bucket of the first dataset.
    size: Any = attrs.field(default=None, validator=_sample_size)
    scheduler: str = attrs.field(default="ddim", validator=_sample_scheduler)
    #: Classifier-free guidance scale (1 or less: no guidance).
    cfg: float = attrs.field(default=7.0, validator=in_range(0, MAX_CFG))

    def resolution(self, default: Tuple[int, int]) -> Tuple[int, int]:
        """``(width, height)`` to sample at; ``default`` when ``size`` is not set."""
        return default if self.size is None else parse_size(self.size)


@attrs.define
class Pipeline:
    """A whole pipeline after merging bases and overrides."""

    model: ModelConfig
    data: Dict[str, DatasetConfig]
    seed: int = attrs.field(default=0, validator=seed_in_range)
    #: Where the run writes; blank would write into the working directory itself.
    exp_dir: str = attrs.field(default="runs/exp", validator=not_blank)
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
