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

from typing import Any, Dict, List, Optional, Tuple, Union

import attrs

from ..registry import BucketSpec, LossSpec, ModelFamilySpec, OptimizerSpec, SchedulerSpec, SourceSpec, TrackerSpec
from .validators import at_least, fail, greater_than, in_range, not_blank, one_of, seed_in_range
from .values import MAX_SIDE, fill_placeholders, parse_colour, parse_size, placeholders, unknown_scheduler

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Upper bounds that only refuse absurd values (each far beyond any real run).
MAX_STEPS = 100_000_000
MAX_GRADIENT_ACCUMULATION = 4096
MAX_BATCH_SIZE = 4096
MAX_NUM_WORKERS = 1024
#: Training length when neither ``train.max_steps`` nor ``train.epochs`` is set.
DEFAULT_MAX_STEPS = 1000
MAX_EPOCHS = 1_000_000
MAX_VALIDATION_IMAGES = 1_000_000
#: diffusers' samplers refuse more steps than the model's 1000 training timesteps.
MAX_SAMPLE_STEPS = 1000
MAX_CFG = 100.0

#: A fraction in [0, 1): EMA decay, Adam's betas, SGD momentum (1 or more never forgets / diverges).
_unit_open = in_range(0, 1, high_open=True)


VAE_DTYPES = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Inductor modes that replay CUDA graphs (torch's "cudagraph trees").
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@attrs.define
class CompileConfig:
    """``model.compile`` as a table; ``compile = true`` is this with its defaults."""

    #: torch.compile's mode (inductor only): "max-autotune-no-cudagraphs" tunes kernels for long
    #: runs; the cudagraph modes need static shapes (one bucket) and cost memory.
    mode: str = attrs.field(default="default", validator=one_of(COMPILE_MODES))
    #: "auto" (torch's own choice): the first bucket size gets a specialised graph; a size that
    #: differs makes the sides that changed symbolic (at most three graphs for every bucket to
    #: come). True: symbolic sizes from the start; False: one graph per bucket size (faster
    #: kernels, one compile per bucket, at most ``recompile_limit``). Symbolic graphs compile much
    #: slower: an SD 1.5 UNet with LoRA took 113 s specialised and over 300 s symbolic on an H200.
    dynamic: Union[bool, str] = "auto"
    #: "inductor" generates kernels (needs a C++ compiler on CPU, triton on CUDA); "aot_eager" and
    #: "eager" only trace (for checking that a model compiles, no speed-up).
    backend: str = attrs.field(default="inductor", validator=one_of(COMPILE_BACKENDS))
    #: Graphs kept per compiled function (torch._dynamo.config.recompile_limit); beyond it the
    #: denoiser runs eagerly for new shapes, with a warning.
    recompile_limit: int = attrs.field(default=16, validator=in_range(1, 1024))

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled graphs replay as CUDA graphs (inductor's cudagraph modes)."""
        return self.backend == "inductor" and self.mode in CUDA_GRAPH_MODES


def compile_options(value: Any) -> Optional[CompileConfig]:
    """``model.compile`` as a :class:`CompileConfig` (None when off); ValueError names a bad key."""
    if value is False or value is None:
        return None
    if value is True:
        return CompileConfig()
    if not isinstance(value, dict):
        raise ValueError(f"expected true, false or a table such as {{ mode = \"default\", dynamic = true }}, got {value!r}")
    fields = [f.name for f in attrs.fields(CompileConfig)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; the keys are {', '.join(fields)}")
    if "dynamic" in value and not isinstance(value["dynamic"], bool) and value["dynamic"] != "auto":
        raise ValueError(f"dynamic must be true, false or \"auto\", got {value['dynamic']!r}")
    try:
        return CompileConfig(**value)
    except (ValueError, TypeError) as exc:
        where = exc.args[1].name + ": " if len(exc.args) > 1 and hasattr(exc.args[1], "name") else ""
        raise ValueError(f"{where}{exc.args[0]}") from None


def _compile_value(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        options = compile_options(value)
    except ValueError as exc:
        fail(attribute, str(exc))
    if options is not None and options.mode != "default" and options.backend != "inductor":
        fail(attribute, f"mode {options.mode!r} needs backend = \"inductor\", got {options.backend!r}")


def _vae_fp32_alone(inst: Any, attribute: attrs.Attribute, value: Optional[bool]) -> None:
    if value is not None and inst.vae_dtype != "auto":
        fail(attribute, f"set either vae_dtype ({inst.vae_dtype!r}) or the older vae_fp32, not both; "
                        "remove vae_fp32")


def _cache_text_plain(inst: Any, attribute: attrs.Attribute, value: bool) -> None:
    if value and inst is not None and inst.prompt_emphasis:
        fail(attribute, "cannot be used with model.prompt_emphasis: an emphasised prompt's encoding depends on how "
                        "many chunks the other prompts of its batch have (webui rescales over the padded length); "
                        "set one of them to false")


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
    #: The VAE's weights: "auto" (bf16 under bf16 mixed precision for VAEs known to be safe in it:
    #: SD 1.x/2.x, SD3, FLUX; fp32 otherwise, e.g. SDXL's, which overflows in fp16), "fp32", "bf16", "fp16".
    vae_dtype: str = attrs.field(default="auto", validator=one_of(VAE_DTYPES))
    #: Deprecated spelling: true is vae_dtype = "fp32", false the mixed precision's dtype.
    vae_fp32: Optional[bool] = attrs.field(default=None, validator=_vae_fp32_alone)
    #: torch.compile the denoiser: false (default), true, or a table { mode, dynamic, backend,
    #: recompile_limit } (CompileConfig; docs/training.md, "Compiling the denoiser").
    compile: Any = attrs.field(default=False, validator=_compile_value)
    #: The model family (``"sd"``, ``"sdxl"``, a plugin's): a name or ``{ type = "...", ... }``
    #: with the family's options. Left out, it is detected from the model folder.
    family: Optional[ModelFamilySpec] = None
    #: Encode every (fixed) prompt once before training and move the text encoders off the GPU
    #: (families that offer it: SD, SDXL, FLUX, SD3; not with prompt_emphasis; docs/training.md).
    cache_text: bool = attrs.field(default=False, validator=_cache_text_plain)
    #: Store the denoiser's frozen Linear weights as float8_e4m3fn, upcast per forward (kohya's
    #: --fp8_base; halves their memory against bf16, rounds them once; docs/flux.md, "Memory").
    fp8_base: bool = False
    #: TF32 for fp32 matrix products and convolutions on CUDA (inputs rounded to 10 mantissa bits,
    #: fp32 sums): much faster fp32 work on Ampere and newer (an fp32 VAE, mixed_precision = "no").
    #: false leaves torch's own setting (off for matrix products unless your code turned it on).
    allow_tf32: bool = False
    #: Read webui-style emphasis in training prompts, ``(word:1.2)`` ``(word)`` ``[word]``, and
    #: weight those tokens' encoder outputs (SD/SDXL only; docs/data.md, "Prompt emphasis").
    prompt_emphasis: bool = False


def _schedule_free_fits(inst: "TrainConfig", attribute: attrs.Attribute, value: Any) -> None:
    """A schedule-free optimizer replaces the lr schedule and the weight average: refuse both beside it."""
    optimizer = inst.optimizer if inst is not None else None
    if optimizer is None or not getattr(optimizer.config, "schedule_free", False):
        return
    if attribute.name == "scheduler" and value is not None and not getattr(value.config, "constant", False):
        fail(attribute, f"the schedule-free optimizer '{optimizer.name}' needs a constant lr: set train.scheduler = "
                        f"\"constant\" without warmup_steps (use train.optimizer.warmup_steps), got {value.name!r}")
    if attribute.name == "ema" and value.enabled:
        fail(attribute, f"the schedule-free optimizer '{optimizer.name}' already averages the weights it exports: "
                        "set train.ema.enabled = false")


@attrs.define
class EmaConfig:
    """``train.ema``: exponential moving average of the trained weights."""

    enabled: bool = False
    decay: float = attrs.field(default=0.999, validator=_unit_open)


def _one_length(inst: Any, attribute: attrs.Attribute, value: Optional[int]) -> None:
    """``train.epochs`` and ``train.max_steps`` both say how long to train: only one may be set."""
    if inst is not None and value is not None and inst.max_steps is not None:
        fail(attribute, f"set either train.max_steps or train.epochs, not both (max_steps = {inst.max_steps}, "
                        f"epochs = {value}); remove one")


def _default_loss() -> Any:
    return None  # filled with the registered "mse" loss when the pipeline is structured


@attrs.define
class TrainConfig:
    """``[train]``: the loop's hyper-parameters."""

    #: Optimizer steps. Exactly one of ``max_steps`` and ``epochs``; neither: DEFAULT_MAX_STEPS.
    max_steps: Optional[int] = attrs.field(default=None, validator=in_range(1, MAX_STEPS))
    gradient_accumulation: int = attrs.field(default=1, validator=in_range(1, MAX_GRADIENT_ACCUMULATION))
    #: Gradient clipping norm; 0 or unset: no clipping.
    max_grad_norm: Optional[float] = attrs.field(default=1.0, validator=at_least(0))
    save_every: int = attrs.field(default=0, validator=at_least(0))  # 0: only at the end
    log_every: int = attrs.field(default=10, validator=at_least(1))
    #: ``{ type = "<name>", ... }`` or a name (hook hcp_register_optimizers); None only before
    #: the pipeline is structured, which fills in "adamw".
    optimizer: Optional[OptimizerSpec] = None
    #: Learning-rate schedule (hook hcp_register_schedulers); filled in as "constant".
    scheduler: Optional[SchedulerSpec] = attrs.field(default=None, validator=_schedule_free_fits)
    loss: Optional[LossSpec] = None  # None means the registered "mse"
    #: Min-SNR weighting; 0 would weigh every loss to zero.
    min_snr_gamma: Optional[float] = attrs.field(default=None, validator=greater_than(0))
    noise_offset: float = attrs.field(default=0.0, validator=in_range(0, 1))
    ema: EmaConfig = attrs.field(factory=EmaConfig, validator=_schedule_free_fits)
    #: Where the main process logs (hook hcp_register_trackers): names or ``{ type = ... }``
    #: tables. Unset: TensorBoard when it is installed (see hcp_core/train/trackers.py).
    trackers: Optional[List[TrackerSpec]] = None
    keep_checkpoints: int = attrs.field(default=2, validator=at_least(1))
    #: Passes over ``epoch_dataset`` to train, instead of ``max_steps`` (docs/training.md, "Epochs").
    epochs: Optional[int] = attrs.field(default=None, validator=[in_range(1, MAX_EPOCHS), _one_length])
    #: The dataset whose passes are the epochs; unset: the one with the most batches per epoch.
    epoch_dataset: Optional[str] = attrs.field(default=None, validator=not_blank)
    #: Checkpoint + exports at the end of every N epochs of ``epoch_dataset`` (0: off).
    save_every_epochs: int = attrs.field(default=0, validator=in_range(0, MAX_EPOCHS))

    def __attrs_post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS


def _num_workers(inst: Any, attribute: attrs.Attribute, value: Union[int, str]) -> None:
    if isinstance(value, str):
        if value != "auto":
            fail(attribute, f'must be a number of workers (0 to {MAX_NUM_WORKERS}) or "auto", got {value!r}')
        return
    in_range(0, MAX_NUM_WORKERS)(inst, attribute, value)


@attrs.define
class DatasetConfig:
    """``[data.<name>]``: one of the parallel datasets; each step draws one batch from each."""

    sources: List[SourceSpec]
    bucket: BucketSpec
    batch_size: int = attrs.field(default=1, validator=in_range(1, MAX_BATCH_SIZE))
    #: This dataset's share of the loss; 0 trains nothing on it, NaN would poison every step.
    loss_weight: float = attrs.field(default=1.0, validator=at_least(0))
    cache_latents: bool = False
    #: DataLoader worker processes (the run also caps them to the CPU count). ``"auto"``: a few on a
    #: GPU, where decoding in the training process would leave the GPU waiting; none on a CPU, where
    #: workers would take cores from the step itself (:func:`hcp_core.data.loader.auto_num_workers`).
    num_workers: Union[int, str] = attrs.field(default="auto", validator=_num_workers)
    #: Where cached latents live; default ``<exp_dir>/latent_cache``.
    cache_dir: Optional[str] = attrs.field(default=None, validator=not_blank)
    #: Colour transparent images (RGBA, LA, paletted with transparency) are composited on.
    background: str = attrs.field(default="white")
    #: Probability that a sample is mirrored left-right (image and mask together; docs/data.md).
    flip: float = attrs.field(default=0.0, validator=in_range(0, 1))

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


def _split_size(inst: Any, attribute: attrs.Attribute, value: Optional[int]) -> None:
    if inst is not None and (value is None) == (inst.fraction is None):
        fail(attribute, "set exactly one of fraction (e.g. fraction = 0.1) and count (e.g. count = 4)")


@attrs.define
class HoldoutConfig:
    """``[validation.split.<dataset>]``: images of training dataset ``<dataset>`` held out of
    training and used for validation; which ones is a function of the seed (docs/training.md)."""

    fraction: Optional[float] = attrs.field(default=None, validator=in_range(0, 1, low_open=True, high_open=True))
    count: Optional[int] = attrs.field(default=None, validator=[in_range(1, MAX_VALIDATION_IMAGES), _split_size])


@attrs.define
class ValidationConfig:
    """``[validation]``: a loss on held-out images with fixed noise and timesteps, every ``every``
    steps and at the end (docs/training.md, "Validation")."""

    every: int = attrs.field(default=0, validator=in_range(0, MAX_STEPS))  # 0: only at the end
    #: Training dataset name -> the part of it held out.
    split: Dict[str, HoldoutConfig] = attrs.field(factory=dict)
    #: Validation datasets of their own, with the keys of ``[data.<name>]``.
    data: Dict[str, DatasetConfig] = attrs.field(factory=dict)


def _known_datasets(inst: Any) -> str:
    return ", ".join(inst.data) or "none"


def _epoch_dataset_known(inst: Any, attribute: attrs.Attribute, value: TrainConfig) -> None:
    name = value.epoch_dataset
    if inst is not None and name is not None and name not in inst.data:
        fail(attribute, f"epoch_dataset = {name!r} is not a dataset; set it to one of the [data.<name>] "
                        f"tables: {_known_datasets(inst)}")


def _accumulation_fits_compile(inst: Any, attribute: attrs.Attribute, value: TrainConfig) -> None:
    """CUDA graphs hand each backward's gradients out of memory that their next replay reuses, so
    gradients accumulated over micro-steps would be overwritten (torch stops with an error)."""
    if inst is None or value.gradient_accumulation == 1:
        return
    options = compile_options(inst.model.compile)
    if options is not None and options.cuda_graphs:
        fail(attribute, f"gradient_accumulation = {value.gradient_accumulation} cannot run with model.compile mode "
                        f"{options.mode!r}: its CUDA graphs reuse the memory of one micro-step's gradients in the "
                        "next; set gradient_accumulation = 1 (raise batch_size instead) or compile with mode = "
                        "\"default\"")


def _validation_datasets(inst: Any, attribute: attrs.Attribute, value: Optional[ValidationConfig]) -> None:
    if inst is None or value is None:
        return
    if not value.split and not value.data:
        fail(attribute, "no validation data: add [validation.split.<dataset>] (fraction = 0.1 or count = 4) to hold "
                        "out images of a training dataset, or a [validation.data.<name>] dataset of its own")
    unknown = [name for name in value.split if name not in inst.data]
    if unknown:
        fail(attribute, f"split.{unknown[0]}: no training dataset {unknown[0]!r} to hold images out of; "
                        f"datasets: {_known_datasets(inst)}")
    both = sorted(set(value.split) & set(value.data))
    if both:
        fail(attribute, f"{both[0]!r} is both a split and a validation dataset; rename data.{both[0]} (each "
                        "name is logged as val_loss/<name>)")


#: Characters Windows refuses in file names, and path separators.
_BAD_NAME_CHARS = set('<>:"/\\|?*')


def _file_stem(inst: Any, attribute: attrs.Attribute, value: Optional[str]) -> None:
    if value is None:
        return
    bad = sorted({c for c in value if c in _BAD_NAME_CHARS or ord(c) < 32})
    if not value.strip() or value.strip() != value or value.startswith(".") or bad:
        fail(attribute, f"{value!r} is not usable as a file name (no leading/trailing blanks or dot, none of "
                        f"{' '.join(sorted(_BAD_NAME_CHARS))}); e.g. output_name = \"my-style-v1\"")


@attrs.define
class Pipeline:
    """A whole pipeline after merging bases and overrides."""

    model: ModelConfig
    data: Dict[str, DatasetConfig]
    seed: int = attrs.field(default=0, validator=seed_in_range)
    #: Where the run writes; blank would write into the working directory itself.
    exp_dir: str = attrs.field(default="runs/exp", validator=not_blank)
    train: TrainConfig = attrs.field(factory=TrainConfig, validator=[_epoch_dataset_known, _accumulation_fits_compile])
    sample: Optional[SampleConfig] = None
    #: Base name of the exported files (``<output_name>.safetensors``); None: the adapters' own names.
    output_name: Optional[str] = attrs.field(default=None, validator=_file_stem)
    validation: Optional[ValidationConfig] = attrs.field(default=None, validator=_validation_datasets)
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
