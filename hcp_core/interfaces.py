"""What each family's factory returns, and the plain data that flows between them.

Hooks run once at start-up; these objects do the per-sample and per-step work. They are plain
Python (no pluggy on the hot path) and must be picklable, because DataLoader workers receive them.
Torch is imported lazily by implementations, never here.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch

Size = Tuple[int, int]  # (width, height) in pixels


# --------------------------------------------------------------------------- data sources
@attrs.frozen
class Problem:
    """A file hcp could not use as it is, and what it did about it."""

    path: str
    what: str  # e.g. "corrupt or truncated image"
    action: str  # e.g. "skipped", "captioned as empty"

    def __str__(self) -> str:
        return f"{self.path}: {self.what} ({self.action})"


@attrs.frozen
class PromptParts:
    """The text of one sample while text transforms work on it."""

    template: str  # e.g. "a photo of a {pt1}, {caption}"
    caption: str  # "" when the image has none


class TextTransform(Protocol):
    """Built by a text-transform factory: ``factory(config) -> TextTransform``."""

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts: ...


@attrs.frozen
class ImageRecord:
    """One usable training image, as a data source found it (no pixels decoded)."""

    image: str  # path to the image file
    size: Size  # (w, h) as displayed, EXIF orientation applied, read from the header
    caption: Optional[str] = None
    mask: Optional[str] = None  # grayscale attention mask, same stem as the image
    templates: Tuple[str, ...] = ("{caption}",)
    text_transforms: Tuple[Any, ...] = ()  # built TextTransform objects, applied in order
    repeat: int = 1
    source: str = ""  # which source found it, for messages


@attrs.frozen
class ScanResult:
    """What a data source's scan returns."""

    records: List[ImageRecord]
    problems: List[Problem] = attrs.field(factory=list)


class DataSource(Protocol):
    """Built by ``factory(config, *, context: SourceContext) -> DataSource``."""

    def scan(self) -> ScanResult: ...


@attrs.frozen
class SourceContext:
    """What a data source gets besides its config."""

    registry: Any  # hcp_core.registry.Registry, to build its own text transforms
    base_dir: str = "."  # relative paths in the config resolve against this
    dataset: str = ""  # the [data.<name>] this source belongs to


# --------------------------------------------------------------------------- buckets
@attrs.frozen
class CropPlan:
    """Resize the image to ``resize`` (w, h), then crop ``box`` = (left, top, right, bottom)."""

    resize: Size
    box: Tuple[int, int, int, int]


class Bucket(Protocol):
    """Built by ``factory(config, *, context: BucketContext) -> Bucket``."""

    #: True when :meth:`crop` ignores ``rng`` (then latents can be cached).
    deterministic: bool

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        """Choose the bucket sizes (w, h) for a data set whose images have ``sizes``."""
        ...

    def assign(self, size: Size, buckets: Sequence[Size]) -> int:
        """Index of the bucket an image of ``size`` goes to."""
        ...

    def crop(self, size: Size, bucket: Size, rng: Optional[random.Random]) -> CropPlan:
        """How an image of ``size`` becomes exactly ``bucket``; ``rng`` None means centred."""
        ...


@attrs.frozen
class BucketContext:
    seed: int = 0
    dataset: str = ""


# --------------------------------------------------------------------------- losses
@attrs.frozen
class LossInputs:
    """Everything a loss may use besides prediction and target."""

    timesteps: Any  # LongTensor [B]
    weight_map: Any = None  # attention-mask weights [B, 1, h, w] at latent size, or None
    snr: Any = None  # signal-to-noise ratio per sample [B], or None


class Loss(Protocol):
    """Built by ``factory(config) -> Loss``; returns one loss value per sample, shape [B]."""

    def __call__(self, pred: "torch.Tensor", target: "torch.Tensor", inputs: LossInputs) -> "torch.Tensor": ...


# --------------------------------------------------------------------------- adapters
@attrs.define
class ModelBundle:
    """The loaded diffusion model's parts. SDXL fills the ``*_2`` fields."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    kind: str = "sd"  # "sd" (1.x/2.x) or "sdxl"; other families name themselves
    #: Denoisers and encoders of other families (a diffusion transformer, a third text encoder).
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    source: str = ""  # where it was loaded from, for metadata
    prediction_type: str = "epsilon"

    @property
    def denoiser(self) -> Any:
        """The network that predicts noise or velocity: the UNet, or the transformer."""
        return self.unet if self.unet is not None else self.transformer

    def modules(self) -> Dict[str, Any]:
        """Every loaded torch module by part name (UNet or transformer, text encoders, VAE)."""
        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def part(self, target: str) -> Any:
        """The module an adapter section targets ("unet", "text_encoder", "text_encoder_2")."""
        module = getattr(self, target, None)
        if module is None:
            raise ValueError(f"this model has no '{target}'")
        return module


@attrs.frozen
class AdapterContext:
    """What an adapter gets besides its configs.

    ``default_layers`` is the model family's optional ``default_layers(part)`` (None when the
    family has none): the layer patterns an adapter may use for a group that names no layers.
    """

    exp_dir: str
    base_dir: str = "."
    clip_skip: int = 0
    resolution: Optional[Size] = None
    seed: int = 0
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    #: ``part -> layer patterns`` (hcp's syntax: names or ``re:`` patterns), from the model family.
    default_layers: Optional[Callable[[str], List[str]]] = None


@attrs.frozen
class FileHeader:
    """What hcp read of a file an adapter may own (``hcp generate --lora FILE``), without its tensors.

    For a ``.safetensors`` file: its ``__metadata__`` strings and its tensor names; for any other
    file (or an unreadable one) both are empty and ``safetensors`` is False.
    """

    path: str
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    keys: Tuple[str, ...] = ()
    safetensors: bool = False


class AdapterFiles(Protocol):
    """Built by an adapter's ``files`` factory: ``files() -> AdapterFiles`` (``registry.add(..., files="module:attr")``).

    What lets ``hcp generate --lora`` and ``hcp tools merge-lora`` use files this adapter writes.
    """

    def reads(self, header: FileHeader) -> bool:
        """Whether this adapter can apply the file; decide from the header alone, cheaply (no torch)."""
        ...

    def apply(self, models: "ModelBundle", path: str, weight: float) -> int:
        """Merge the file into ``models``' weights (float32 maths), scaled by ``weight``; return
        how many layers changed. Raise a ``UserError`` naming the file when it does not fit."""
        ...


class Adapter(Protocol):
    """Built by ``factory(sections, *, context: AdapterContext) -> Adapter``.

    ``sections`` maps a model part ("unet", "text_encoder") to the list of structured configs
    from every pipeline section this adapter owns that targets that part.

    Optional members: ``attach_order`` (int, default 0; lower attaches first — fine-tuning,
    which selects layers by their original names, uses -10 so it runs before LoRA wraps them)
    and ``wrap_prompt_encoder(encoder) -> encoder`` (called once after attach; prompt tuning
    returns an encoder that expands custom words into their token vectors). A returned encoder
    may carry ``guidance``, a :class:`~hcp_core.train.diffusion.TrainingGuidance` (DreamArtist):
    a family that supports it then trains on the guided prediction of prompts and negative prompts.
    """

    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        """Modify ``models`` in place; return optimizer parameter groups (``{"params", "lr"}``)."""
        ...

    def trainable_state(self) -> Dict[str, "torch.Tensor"]:
        """Tensors this adapter trains, by stable name, for checkpoints and resume."""
        ...

    def load_trainable_state(self, state: Mapping[str, "torch.Tensor"]) -> None:
        """Restore what :meth:`trainable_state` returned."""
        ...

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        """Write user-facing files (``step`` None = final); return their paths."""
        ...


# --------------------------------------------------------------------------- model families
@attrs.frozen
class TrainingPrediction:
    """One micro-batch's denoiser output and what it is scored against.

    ``weights`` (per sample, or None) multiply the loss (min-SNR, SD3-style weighting schemes);
    ``timesteps`` and ``snr`` reach the loss in :class:`LossInputs`.
    """

    pred: Any  # the denoiser's output, shaped like ``target``
    target: Any
    timesteps: Any
    snr: Any = None
    weights: Any = None


class ModelFamily(Protocol):
    """Built by ``factory(config) -> ModelFamily`` (hook ``hcp_register_models``).

    It owns what differs between architectures: loading, prompt encoding, the training
    objective and rendering images. ``parts`` names the model parts adapters may target.

    Optional members: ``size_multiple(models) -> int`` (what bucket sides must be multiples of,
    default the latent factor; a transformer patching 2x2 latents needs twice it),
    ``text_cache = True`` (prompt outputs have a fixed shape per prompt, or the prompt encoder
    offers ``chunk_count(prompt)`` and pads a batch with empty-prompt chunks, so
    ``model.cache_text`` may encode them once: :mod:`hcp_core.train.text_cache`) and
    ``default_layers(part) -> List[str]`` (the layer patterns a LoRA
    group on ``part`` uses when it names no ``layers``; an empty list when the family has none
    for that part), ``custom_words = True`` (``hcp generate --embeddings`` works on its models),
    ``write_single_file(models, path, dtype) -> Path`` (``merge-lora --single-file`` writes its
    models as one file) with ``single_file_problem(models) -> Optional[str]`` (why a model cannot
    be, or None), ``clip_skip_problem(models, clip_skip) -> Optional[str]`` (why ``hcp generate
    --clip-skip`` is out of range, or None), ``vae_upcast_in_fp16(models) -> bool`` (fp16
    generation keeps the VAE in fp32),
    ``check_options(pipeline)`` (raise a :class:`~hcp_core.errors.UserError` for pipeline options
    the family cannot honour; called when a run is set up and by ``hcp check``, before any weight
    is read), ``sampling_pipeline(models, sampler)`` (a diffusers pipeline taking batches of
    plain prompts, for ``hcp tools gen-from-prompts``) and ``vae_safe_in_bf16(models) -> bool``
    (``model.vae_dtype = "auto"`` may hold the VAE in bf16 under bf16 mixed precision; without it
    the VAE stays fp32).
    """

    parts: Tuple[str, ...]

    def load(self, pretrained: str, *, config: Optional[str] = None, prediction_type: Optional[str] = None) -> ModelBundle:
        """The model at ``pretrained`` (a local folder or file), every part frozen, in fp32."""
        ...

    def load_skeleton(self, pretrained: str, *, config: Optional[str] = None,
                      prediction_type: Optional[str] = None) -> Optional[ModelBundle]:
        """The same modules on the ``meta`` device, no weight read (``hcp check``); None if impossible."""
        ...

    def latent_factor(self, models: ModelBundle) -> int:
        """Pixels per latent side (bucket sides are multiples of it)."""
        ...

    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> Any:
        """A callable turning prompts into this family's text conditioning (adapters may wrap it)."""
        ...

    def training_prediction(self, models: ModelBundle, encoder: Any, batch: Mapping[str, Any], latents: Any,
                            sample_ids: List[int], *, seed: int, step: int, train: Any, autocast: Any,
                            train_text: bool) -> TrainingPrediction:
        """Noise the scaled ``latents``, run the denoiser and return prediction and target.

        Randomness must come from generators keyed on ``(seed, step, sample id)`` so that runs are
        reproducible and resumable; ``train`` is the pipeline's ``[train]`` config.
        """
        ...

    def render(self, models: ModelBundle, encoder: Any, params: Any, *, autocast: Any) -> Any:
        """One PIL image for :class:`~hcp_core.generation.params.GenerationParams` (``[sample]``)."""
        ...


# --------------------------------------------------------------------------- trackers
@attrs.frozen
class TrackerContext:
    """What a tracker factory gets besides its config (hook ``hcp_register_trackers``)."""

    exp_dir: str  # the run folder (a tracker writing files puts them inside it)
    run_name: str  # the run folder's name: a default project / run name
    config: Mapping[str, Any]  # the resolved pipeline as plain data (what `hcp config` prints)


class Tracker(Protocol):
    """What a tracker factory returns; only the main process has one."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        ...

    def add_image(self, tag: str, image: Any, step: int) -> None:
        """``image``: an ``HxWx3`` uint8 numpy array."""
        ...

    def flush(self) -> None:
        ...

    def close(self) -> None:
        ...
