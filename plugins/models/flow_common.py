"""What the flow-matching transformer families (``flux``, ``sd3``) share.

* **Loading** (:class:`FlowMatchingFamily`): a complete local diffusers folder, part by part,
  offline, in fp32, frozen, or a single-file transformer checkpoint with ``model.config`` naming
  the folder of the other parts; the same modules on the ``meta`` device for ``hcp check``; clear
  errors naming the part or file.
* **Prompts**: :func:`tokenize_to_length` (padded and truncated token ids, with a warning naming
  what was cut, as diffusers' pipelines warn) and :func:`t5_hidden_states`.
* **Objective**: per sample a sigma (the configured density and shift), noise, ``x_t``, the
  transformer's prediction and the velocity target ``noise - x0``, optional SD3-style weights
  (:meth:`FlowMatchingFamily.training_prediction`); a family supplies the transformer's keyword
  arguments (:meth:`~FlowMatchingFamily.transformer_inputs`) and, if it packs latents, how the
  output is unpacked (:meth:`~FlowMatchingFamily.unpack_prediction`).
* **Images**: the family's diffusers pipeline around the bundle's modules, seeded, in eval mode,
  the VAE outside autocast (:meth:`FlowMatchingFamily.render`); a family supplies the prompt
  keyword arguments (:meth:`~FlowMatchingFamily.prompt_kwargs`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attrs
import torch

from hcp_core.devices import to_device
from hcp_core.errors import ConfigError, UserError
from hcp_core.interfaces import ModelBundle, TrainingPrediction
from hcp_core.models.modes import modules_in_eval

from . import flow_matching as fm

log = logging.getLogger(__name__)

#: What ``ModelBundle.prediction_type`` says for the flow-matching families.
PREDICTION_TYPE = "flow_match"
#: ``[sample] scheduler`` values a flow family accepts: "euler" names the flow-matching Euler sampler
#: it always uses; "ddim" is the option's default, which every written config.toml carries.
FLOW_SAMPLER_NAMES = ("euler", "ddim")


# --------------------------------------------------------------------------- prompts
def tokenize_to_length(tokenizer: Any, prompts: List[str], length: int, what: str) -> torch.Tensor:
    """Token ids ``[B, length]``, padded and truncated as diffusers' pipelines tokenize; a warning
    shows what a too-long prompt lost."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        dropped = [t for t in tokenizer.batch_decode(full[:, length - 1:], skip_special_tokens=True) if t.strip()]
        shown = "; ".join(repr(t[:80] + ("..." if len(t) > 80 else "")) for t in dropped)
        log.warning("prompt cut to %d %s tokens, dropping: %s", length, what, shown)
    return ids


class TwoStepPromptEncoder:
    """Base of the flow families' prompt encoders: ``tokenize`` then ``encode``, separate steps so
    that wrappers can change the token ids in between.

    ``encoders`` lists the CLIP parts as hcp :class:`~hcp_core.models.text_encoding.PromptEncoder`
    objects (one 77-token window each), in text-encoder part order: prompt tuning
    (:func:`hcp_core.models.custom_words.wrap_for_words`) replaces them in a copy with encoders that
    expand custom words. T5 is not among them: it always reads the prompt text as written.
    """

    encoders: List[Any] = []

    @property
    def uses(self) -> Optional[Dict[str, int]]:
        """How often each custom word was put into a prompt (the first CLIP's count), or None
        without custom words."""
        return getattr(self.encoders[0], "uses", None) if self.encoders else None

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Any:
        raise NotImplementedError

    def encode(self, ids: Any) -> Any:
        raise NotImplementedError

    def __call__(self, prompts: Union[str, Sequence[str]]) -> Any:
        """``encode(tokenize(prompts))``."""
        return self.encode(self.tokenize(prompts))


def t5_hidden_states(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """T5's last hidden states for ``ids``, in the encoder's dtype (as the pipelines' ``_get_t5_prompt_embeds``)."""
    hidden = text_encoder(to_device(ids, text_encoder.device), output_hidden_states=False)[0]
    return hidden.to(dtype=text_encoder.dtype)


# --------------------------------------------------------------------------- loading helpers
def load_error(message: str) -> UserError:
    from hcp_core.models.loading import ModelLoadError

    return ModelLoadError(message)


def part_error(path: Path, part: str, err: BaseException) -> UserError:
    return load_error(
        f"could not load the {part} of '{path}' from '{path / part}': {err}. "
        f"The {part}/ folder may be incomplete; copy it again from the model's source."
    )


def tokenizer_class(index: Mapping[str, Any], part: str) -> Any:
    """The transformers class ``model_index.json`` names for a (T5) tokenizer, else ``AutoTokenizer``."""
    import transformers
    from transformers import AutoTokenizer

    cls = getattr(transformers, str(index[part][1]), None)
    return cls if cls is not None and hasattr(cls, "from_pretrained") else AutoTokenizer


def read_index(path: Path) -> Dict[str, Any]:
    return json.loads((path / "model_index.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the shared family
@attrs.frozen
class FlowModelSpec:
    """What tells one flow-matching family's diffusers folder and messages from another's."""

    label: str  # the family's name in messages ("FLUX", "SD3")
    kind: str  # ModelBundle.kind
    folder_parts: Tuple[str, ...]  # parts of the diffusers folder, all required
    module_parts: Tuple[str, ...]  # the parts that are torch modules (frozen after loading)
    pipeline_class: str  # the diffusers pipeline class that renders images
    example_source: str  # where a user gets the diffusers folder, for messages


class FlowMatchingFamily:
    """Loading, the rectified-flow objective and rendering of a diffusers flow-matching model.

    Subclasses set :attr:`spec` and :attr:`config_class` and implement :meth:`part_classes`,
    :meth:`prompt_encoder`, :meth:`transformer_inputs` and :meth:`prompt_kwargs`; ``config`` has
    the :class:`~.config.FlowMatchingConfig` fields plus ``shift`` and ``loss_weighting``.
    """

    #: Names, parts and pipeline of the model (set by each family).
    spec: "FlowModelSpec"
    #: The attrs class of the family's options (its defaults when no config is given).
    config_class: Any = None
    #: Prompt outputs have a fixed shape (padded CLIP and T5 tokens, pooled vectors), so
    #: ``model.cache_text`` may encode every prompt once.
    text_cache = True
    #: Part -> the layer patterns a LoRA group on it targets without ``layers`` (set by each
    #: family from :mod:`.default_layers`; a part left out has no defaults).
    default_layer_patterns: Mapping[str, Tuple[str, ...]] = {}
    #: ``hcp generate --embeddings`` works: custom words go into the CLIP encoders (FLUX: CLIP-L;
    #: SD3: CLIP-L and CLIP-G, ``{clip_l, clip_g}`` files), which :class:`TwoStepPromptEncoder`
    #: exposes as ``encoders``; T5 reads the prompt as written.
    custom_words = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    def part_classes(self, path: Path) -> Dict[str, Any]:
        """Part name -> the class that loads it."""
        raise NotImplementedError

    def default_layers(self, part: str) -> List[str]:
        """The layer patterns a LoRA group on ``part`` targets when it names no ``layers``."""
        return list(self.default_layer_patterns.get(part, ()))

    def vae_safe_in_bf16(self, models: Any) -> bool:
        """SD3's and FLUX's 16-channel VAEs encode well in bf16 (``model.vae_dtype = "auto"``)."""
        return True

    # ------------------------------------------------------------------ loading
    def check_prediction_type(self, prediction_type: Optional[str]) -> None:
        if prediction_type not in (None, PREDICTION_TYPE):
            raise load_error(
                f"model.prediction_type = {prediction_type!r} does not apply to {self.spec.label}, which is trained "
                "to predict the flow-matching velocity; leave model.prediction_type out."
            )

    def folder(self, pretrained: str, config: Optional[str] = None) -> Path:
        """The diffusers folder that describes ``pretrained``, checked complete: ``pretrained``
        itself, or for a single-file checkpoint the folder ``config`` (required then)."""
        from hcp_core.models.loading import SINGLE_FILE_SUFFIXES, missing_model_message

        path = Path(pretrained).expanduser()
        listing = ", ".join(["model_index.json"] + [p + "/" for p in self.spec.folder_parts])
        if not path.exists():
            raise load_error(missing_model_message(str(pretrained)))
        if not path.is_dir():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise load_error(f"'{path}' is neither a diffusers folder nor a checkpoint file "
                                 f"({', '.join(SINGLE_FILE_SUFFIXES)}); point model.pretrained at one of those.")
            if config is None:
                raise load_error(
                    f"'{path}' is a single-file {self.spec.label} checkpoint: it holds the transformer, and hcp reads "
                    f"the other parts and every config from a local {self.spec.label} diffusers folder. Set "
                    f"model.config (hcp generate: --model-config) to that folder ({listing}), e.g. "
                    f"{self.spec.example_source} downloaded with `huggingface-cli download`."
                )
            return self.folder(config)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise load_error(
                f"'{path}' is not a diffusers model folder: it has no model_index.json. Point model.pretrained at the "
                f"{self.spec.label} folder that holds {listing}."
            )
        try:
            index = read_index(path)
        except (OSError, ValueError) as err:
            raise load_error(f"'{index_file}' is not valid JSON ({err}); copy it again from the model's source.") from err
        for part in self.spec.folder_parts:
            entry = index.get(part)
            if not entry or entry[0] is None:
                raise load_error(f"'{index_file}' lists no {part}; a {self.spec.label} model needs all of "
                                 f"{', '.join(self.spec.folder_parts)}.")
            if not (path / part).is_dir():
                raise load_error(
                    f"'{path}' has no {part}/ folder although model_index.json names it; the download is incomplete: "
                    f"copy the {part}/ folder from the model's source into '{path}'."
                )
        return path

    def bundle(self, parts: Dict[str, Any], source: str) -> ModelBundle:
        for name in self.spec.module_parts:
            parts[name].requires_grad_(False)
            parts[name].eval()
        return ModelBundle(unet=None, kind=self.spec.kind, source=source, prediction_type=PREDICTION_TYPE, **parts)

    def load(self, pretrained: str, *, config: Optional[str] = None, prediction_type: Optional[str] = None) -> ModelBundle:
        """The model at ``pretrained``, offline, every part frozen (eval, no gradients), in fp32:
        a diffusers folder, or a single-file transformer checkpoint (BFL's / Stability's original
        layout or diffusers' names, read by diffusers' ``from_single_file``) whose other parts and
        configs come from the diffusers folder ``config``."""
        from hcp_core.models.loading import weights_variant
        from hcp_core.models.pipelines import quiet_progress_bars

        self.check_prediction_type(prediction_type)
        path = self.folder(pretrained, config)
        single_file = Path(pretrained).expanduser().is_file()
        quiet_progress_bars()
        parts: Dict[str, Any] = {}
        for part, cls in self.part_classes(path).items():
            if single_file and part == "transformer":
                parts[part] = self.single_file_transformer(cls, Path(pretrained).expanduser(), path)
                continue
            kwargs: Dict[str, Any] = {"local_files_only": True}
            if part in self.spec.module_parts:
                kwargs["torch_dtype" if hasattr(cls, "load_config") else "dtype"] = torch.float32
                variant = weights_variant(path / part)
                if variant:
                    kwargs["variant"] = variant
            try:
                parts[part] = cls.from_pretrained(str(path / part), **kwargs)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
                raise part_error(path, part, err) from err
        return self.bundle(parts, str(Path(pretrained).expanduser() if single_file else path))

    def single_file_transformer(self, cls: Any, file: Path, folder: Path) -> Any:
        """The transformer of a single-file checkpoint, converted by diffusers' ``from_single_file``
        offline with ``folder``'s transformer config, in fp32."""
        try:
            return cls.from_single_file(str(file), config=str(folder), subfolder="transformer", local_files_only=True,
                                        torch_dtype=torch.float32)
        except Exception as err:  # diffusers raises many kinds (KeyError, SingleFileComponentError, ...)
            raise load_error(
                f"could not read '{file}' as a {self.spec.label} transformer shaped like '{folder / 'transformer'}': "
                f"{type(err).__name__}: {err}. model.pretrained must be a {self.spec.label} checkpoint (the original "
                "layout, e.g. the official release file, or diffusers' names) of the architecture model.config describes."
            ) from err

    def load_skeleton(self, pretrained: str, *, config: Optional[str] = None,
                      prediction_type: Optional[str] = None) -> Optional[ModelBundle]:
        """The same modules built from their configs on the ``meta`` device (no weight read);
        tokenizers and the scheduler are real. Errors are those :meth:`load` would raise."""
        from hcp_core.models.loading import skeleton_part

        self.check_prediction_type(prediction_type)
        path = self.folder(pretrained, config)  # a single file is described by its config folder
        parts: Dict[str, Any] = {}
        for part, cls in self.part_classes(path).items():
            try:
                parts[part] = skeleton_part(cls, path / part, part)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
                raise part_error(path, part, err) from err
        return self.bundle(parts, str(path))

    def latent_factor(self, models: ModelBundle) -> int:
        """Pixels per latent side: 2 ** (VAE down blocks - 1), 8 for the 16-channel flow VAEs."""
        return 2 ** (len(models.vae.config.block_out_channels) - 1)

    def patch_size(self, models: ModelBundle) -> int:
        """Latents per transformer token side."""
        return 2

    def size_multiple(self, models: ModelBundle) -> int:
        """What bucket sides must be multiples of: the latent factor times the patch size (16)."""
        return self.latent_factor(models) * self.patch_size(models)

    # ------------------------------------------------------------------ the objective
    def shift_for(self, models: ModelBundle, latent_height: int, latent_width: int) -> float:
        """The static time shift for latents of this size: the configured number."""
        return float(self.config.shift)

    def sigmas_for(self, models: ModelBundle, latents: torch.Tensor, sample_ids: Sequence[int], *,
                   seed: int, step: int) -> torch.Tensor:
        """One noise level per sample, float32 on the latents' device."""
        cfg = self.config
        return fm.sample_sigmas(
            sample_ids, seed=seed, step=step, scheme=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
            shift=self.shift_for(models, latents.shape[-2], latents.shape[-1]), device=latents.device,
        )  # fmt: skip

    def refuse_ddpm_options(self, train: Any) -> None:
        """[train] options of the DDPM objective that flow matching cannot honour: a clear error, not silence."""
        if getattr(train, "min_snr_gamma", None):
            raise ConfigError(f"train.min_snr_gamma applies to the DDPM families (sd, sdxl); {self.spec.label} "
                              "trains with flow matching: use model.family.loss_weighting (\"sigma_sqrt\" or \"cosmap\") instead, "
                              "or remove it.")
        if getattr(train, "noise_offset", 0.0):
            raise ConfigError(f"train.noise_offset applies to the DDPM families (sd, sdxl) only; {self.spec.label} "
                              "trains with flow matching, where how much noise a step sees is set by "
                              "model.family.timestep_sampling and shift: remove it.")

    def refuse_clip_skip(self, clip_skip: int) -> None:
        """A ``model.clip_skip`` the family cannot honour without looking at the model (none here;
        FLUX, which reads only CLIP's pooled output, refuses any)."""

    def check_options(self, pipeline: Any) -> None:
        """Pipeline options that do not apply to flow matching, refused when the run is set up and
        by ``hcp check`` (before any weight is read): ``model.prediction_type``, ``train.min_snr_gamma``,
        ``train.noise_offset``, a ``model.clip_skip`` the family has no use for and a DDPM-only
        ``[sample] scheduler``."""
        self.check_prediction_type(pipeline.model.prediction_type)
        self.refuse_ddpm_options(pipeline.train)
        self.refuse_clip_skip(pipeline.model.clip_skip)
        if getattr(pipeline.model, "prompt_emphasis", False):  # T5 has no emphasis rule to follow
            raise ConfigError(f"model.prompt_emphasis applies to the sd and sdxl families only; {self.spec.label} "
                              "encodes prompts with T5 as well as CLIP: remove model.prompt_emphasis.")
        sample = getattr(pipeline, "sample", None)
        if sample is not None:
            self.refuse_ddpm_sampler(sample.scheduler, "sample.scheduler = {!r}", 'set scheduler = "euler"')

    def refuse_ddpm_sampler(self, name: str, where: str, instead: str) -> None:
        """A sampler other than the flow-matching Euler (:data:`FLOW_SAMPLER_NAMES`): a
        :class:`ConfigError` that says ``where`` (formatted with ``name``) and what to do ``instead``."""
        if name not in FLOW_SAMPLER_NAMES:
            raise ConfigError(
                f"{where.format(name)} is a DDPM sampler; {self.spec.label} samples with its flow-matching Euler "
                f"scheduler (FlowMatchEulerDiscreteScheduler, the model's own shift): {instead} or leave it out."
            )

    def transformer_inputs(self, models: ModelBundle, noisy: torch.Tensor, sigmas: torch.Tensor,
                           text: Any) -> Dict[str, Any]:
        """The transformer's keyword arguments for noisy latents [B, C, h, w] at noise levels ``sigmas``."""
        raise NotImplementedError

    def unpack_prediction(self, pred: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The transformer's output shaped like the latents (unpacked where the family packs)."""
        return pred

    def training_prediction(
        self,
        models: ModelBundle,
        encoder: Any,
        batch: Mapping[str, Any],
        latents: torch.Tensor,
        sample_ids: List[int],
        *,
        seed: int,
        step: int,
        train: Any,
        autocast: Callable[[], ContextManager],
        train_text: bool,
    ) -> TrainingPrediction:
        """Rectified flow: per sample a sigma and noise, the transformer's velocity prediction
        (shaped like the latents) and its target ``noise - latents``."""
        self.refuse_ddpm_options(train)
        noise = fm.draw_noise(latents, sample_ids, seed=seed, step=step)
        sigmas = self.sigmas_for(models, latents, sample_ids, seed=seed, step=step)
        noisy = fm.noisy_latents(latents, noise, sigmas)
        with torch.set_grad_enabled(train_text), autocast():
            text = encoder(list(batch["prompts"]))
        with autocast():
            pred = models.transformer(**self.transformer_inputs(models, noisy, sigmas, text), return_dict=False)[0]
        pred = self.unpack_prediction(pred, latents.shape[-2], latents.shape[-1])
        target = fm.velocity_target(latents, noise)
        weights = fm.loss_weights(sigmas, self.config.loss_weighting)
        return TrainingPrediction(pred=pred, target=target, timesteps=sigmas, snr=None, weights=weights)

    # ------------------------------------------------------------------ images
    def pipeline(self, models: ModelBundle) -> Any:
        """The diffusers pipeline around the bundle's modules, with a fresh flow-matching Euler scheduler."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        parts = {p: getattr(models, p) for p in self.spec.folder_parts if p != "scheduler"}
        pipe = getattr(diffusers, self.spec.pipeline_class)(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.scheduler.config), **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sampling_pipeline(self, models: ModelBundle, sampler: str) -> Any:
        """The family's diffusers pipeline for batches of prompts (``hcp tools gen-from-prompts``):
        :meth:`pipeline`, whose sampler is always the flow-matching Euler; ``sampler`` must say so
        (:data:`FLOW_SAMPLER_NAMES`)."""
        self.refuse_ddpm_sampler(sampler, "--sampler {}", "use --sampler euler")
        return self.pipeline(models)

    def prompt_kwargs(self, encoder: Any, params: Any) -> Dict[str, Any]:
        """The pipeline's prompt keyword arguments (embeddings from ``encoder``), under no_grad and autocast."""
        raise NotImplementedError

    def render(self, models: ModelBundle, encoder: Any, params: Any, *,
               autocast: Callable[[], ContextManager]) -> Any:
        """One PIL image through the family's diffusers pipeline with the models as they are now.

        The prompt is encoded by ``encoder`` (the run's prompt encoder, with whatever adapters
        wrap it); ``params.cfg`` is the pipeline's ``guidance_scale``; ``params.scheduler`` must
        name the model's flow-matching Euler sampler (:data:`FLOW_SAMPLER_NAMES`). The VAE decodes
        outside autocast, in its own precision.
        """
        from hcp_core.generation.params import MAX_SEED
        from hcp_core.generation.render import vae_decode_without_autocast

        self.refuse_ddpm_sampler(params.scheduler, "scheduler {!r} (hcp generate --scheduler)", "use euler")
        if not 0 <= params.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, got {params.seed}")
        multiple = self.size_multiple(models)
        if params.width % multiple or params.height % multiple:
            raise UserError(f"image size {params.width}x{params.height}: {self.spec.label} renders sizes whose "
                            f"sides are multiples of {multiple} (VAE factor x 2x2 patches); change [sample].size")
        pipe = self.pipeline(models)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with modules_in_eval([models.transformer]), torch.no_grad(), autocast(), vae_decode_without_autocast(models.vae):
            result = pipe(
                **self.prompt_kwargs(encoder, params), num_inference_steps=params.steps, guidance_scale=params.cfg,
                width=params.width, height=params.height, generator=generator, output_type="pil",
            )  # fmt: skip
        return result.images[0]
