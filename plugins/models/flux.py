"""The FLUX.1 family (``flux``): dev-style (guidance-distilled) and schnell-style models.

* **Parts** (diffusers naming): ``transformer`` (``FluxTransformer2DModel``), ``text_encoder``
  (CLIP-L: only its pooled output is used), ``text_encoder_2`` (T5: its hidden states are the
  transformer's text tokens), a 16-channel ``vae`` and a flow-matching Euler ``scheduler``.
* **Prompts**: :class:`FluxPromptEncoder` computes exactly what ``FluxPipeline.encode_prompt``
  does: CLIP padded/truncated to 77 tokens -> ``pooler_output``; T5 padded/truncated to
  ``max_sequence_length`` -> last hidden states. No 75-token chunks, no clip skip.
* **Objective**: rectified flow (:mod:`.flow_matching`): per sample a noise level sigma from the
  configured density and shift, ``x_t = (1 - sigma) x0 + sigma noise``, the transformer (fed the
  2x2-packed ``x_t``, sigma as its timestep, position ids and, for dev-style models, the
  ``guidance`` scale) predicts the velocity ``noise - x0``; optional SD3-style loss weights.
  Everything random comes from generators keyed on (seed, step, sample id).
* **Images**: diffusers' ``FluxPipeline`` around the bundle's modules, with the prompt embeddings
  from the run's (possibly wrapped) prompt encoder.

Only local diffusers folders load; single-file FLUX checkpoints are refused with a clear message.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import attrs
import torch

from hcp_core.errors import ConfigError, UserError
from hcp_core.interfaces import ModelBundle, TrainingPrediction

from . import flow_matching as fm
from .config import DYNAMIC_SHIFT, FluxConfig

log = logging.getLogger(__name__)

#: Folder parts of a FLUX.1 diffusers model, all required.
FLUX_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
#: Parts that are torch modules (frozen after loading).
MODULE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
#: What ``ModelBundle.prediction_type`` says for this family.
PREDICTION_TYPE = "flow_match"


# --------------------------------------------------------------------------- prompt encoding
@attrs.frozen
class FluxPrompts:
    """What :class:`FluxPromptEncoder` returns for a batch of prompts."""

    hidden: torch.Tensor  # [B, max_sequence_length, d_t5]: the transformer's encoder_hidden_states
    pooled: torch.Tensor  # [B, d_clip]: CLIP's pooled output, the transformer's pooled_projections


class FluxPromptEncoder:
    """Prompts -> FLUX text conditioning, as ``FluxPipeline.encode_prompt`` computes it.

    :meth:`tokenize` and :meth:`encode` are separate steps (like hcp's ``PromptEncoder``) so that
    wrappers can change the token ids; nothing here disables gradients, so trained text-encoder
    weights get them through :meth:`encode`.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any, *,
                 max_sequence_length: int = 512) -> None:
        self.tokenizer = tokenizer  # CLIP
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2  # T5
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = int(max_sequence_length)
        #: FluxPipeline's ``tokenizer_max_length``: the CLIP tokenizer's model_max_length (77).
        self.clip_length = int(tokenizer.model_max_length) if tokenizer is not None else 77

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        """``{"clip": [B, 77], "t5": [B, max_sequence_length]}`` token ids, padded and truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        clip = self._ids(self.tokenizer, prompts, self.clip_length, "CLIP")
        t5 = self._ids(self.tokenizer_2, prompts, self.max_sequence_length, "T5")
        return {"clip": clip, "t5": t5}

    @staticmethod
    def _ids(tokenizer: Any, prompts: List[str], length: int, what: str) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            dropped = [t for t in tokenizer.batch_decode(full[:, length - 1:], skip_special_tokens=True) if t.strip()]
            shown = "; ".join(repr(t[:80] + ("..." if len(t) > 80 else "")) for t in dropped)
            log.warning("prompt cut to %d %s tokens, dropping: %s", length, what, shown)
        return ids

    def encode(self, ids: Mapping[str, torch.Tensor]) -> FluxPrompts:
        """Hidden states (T5) and pooled output (CLIP) for ids from :meth:`tokenize`."""
        clip = self.text_encoder(ids["clip"].to(self.text_encoder.device), output_hidden_states=False)
        pooled = clip.pooler_output.to(dtype=self.text_encoder.dtype)
        hidden = self.text_encoder_2(ids["t5"].to(self.text_encoder_2.device), output_hidden_states=False)[0]
        hidden = hidden.to(dtype=self.text_encoder_2.dtype)
        return FluxPrompts(hidden=hidden, pooled=pooled)

    def __call__(self, prompts: Union[str, Sequence[str]]) -> FluxPrompts:
        """``encode(tokenize(prompts))``."""
        return self.encode(self.tokenize(prompts))


# --------------------------------------------------------------------------- loading helpers
def _load_error(message: str) -> UserError:
    from hcp_core.models.loading import ModelLoadError

    return ModelLoadError(message)


def _folder(pretrained: str, config: Optional[str]) -> Path:
    """The diffusers folder at ``pretrained``, checked complete; single files are refused."""
    from hcp_core.models.loading import missing_model_message

    path = Path(pretrained).expanduser()
    if not path.exists():
        raise _load_error(missing_model_message(str(pretrained)))
    if not path.is_dir():
        raise _load_error(
            f"'{path}' is a single file: hcp does not read single-file FLUX checkpoints yet. Use the model's "
            "diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, "
            "tokenizer_2/, scheduler/), e.g. black-forest-labs/FLUX.1-dev downloaded with `huggingface-cli download`."
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise _load_error(
            f"'{path}' is not a diffusers model folder: it has no model_index.json. Point model.pretrained at the "
            f"FLUX folder that holds model_index.json and {', '.join(p + '/' for p in FLUX_PARTS)}."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _load_error(f"'{index_file}' is not valid JSON ({err}); copy it again from the model's source.") from err
    for part in FLUX_PARTS:
        entry = index.get(part)
        if not entry or entry[0] is None:
            raise _load_error(f"'{index_file}' lists no {part}; a FLUX.1 model needs all of {', '.join(FLUX_PARTS)}.")
        if not (path / part).is_dir():
            raise _load_error(
                f"'{path}' has no {part}/ folder although model_index.json names it; the download is incomplete: "
                f"copy the {part}/ folder from the model's source into '{path}'."
            )
    return path


def _part_classes(path: Path) -> Dict[str, Any]:
    """Part name -> the class that loads it."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    t5_tokenizer = getattr(transformers, str(index["tokenizer_2"][1]), None)
    if t5_tokenizer is None or not hasattr(t5_tokenizer, "from_pretrained"):
        t5_tokenizer = AutoTokenizer
    return {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel, "tokenizer_2": t5_tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler}  # fmt: skip


def _part_error(path: Path, part: str, err: BaseException) -> UserError:
    return _load_error(
        f"could not load the {part} of '{path}' from '{path / part}': {err}. "
        f"The {part}/ folder may be incomplete; copy it again from the model's source."
    )


def _check_prediction_type(prediction_type: Optional[str]) -> None:
    if prediction_type not in (None, PREDICTION_TYPE):
        raise _load_error(
            f"model.prediction_type = {prediction_type!r} does not apply to FLUX, which is trained to predict the "
            "flow-matching velocity; leave model.prediction_type out."
        )


def _bundle(parts: Dict[str, Any], source: str) -> ModelBundle:
    for name in MODULE_PARTS:
        parts[name].requires_grad_(False)
        parts[name].eval()
    return ModelBundle(
        unet=None, transformer=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
        scheduler=parts["scheduler"], kind="flux", source=source, prediction_type=PREDICTION_TYPE,
    )  # fmt: skip


@contextlib.contextmanager
def _modules_in_eval(modules: Sequence[Any]) -> Iterator[None]:
    """Eval mode inside; every submodule's train/eval mode put back on the way out."""
    modes = {m: m.training for root in modules for m in root.modules()}
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# --------------------------------------------------------------------------- the family
class FluxFamily:
    """FLUX.1: loading, T5 + pooled-CLIP prompts, the flow-matching objective, FluxPipeline images."""

    #: Model parts adapters may target ([[transformer]], [[lora_transformer]], [[text_encoder]], ...).
    parts = ("transformer", "text_encoder", "text_encoder_2")
    #: Prompt outputs have a fixed shape (T5 padded to max_sequence_length, CLIP pooled), so
    #: ``model.cache_text`` may encode every prompt once.
    text_cache = True

    def __init__(self, config: Optional[FluxConfig] = None) -> None:
        self.config = config if config is not None else FluxConfig()

    # ------------------------------------------------------------------ loading
    def load(self, pretrained: str, *, config: Optional[str] = None, prediction_type: Optional[str] = None) -> ModelBundle:
        """The FLUX diffusers folder at ``pretrained``, offline, every part frozen (eval, no
        gradients), in fp32. ``config`` is unused (single files are not read yet)."""
        from hcp_core.models.loading import _weights_variant
        from hcp_core.models.pipelines import quiet_progress_bars

        _check_prediction_type(prediction_type)
        path = _folder(pretrained, config)
        quiet_progress_bars()
        parts: Dict[str, Any] = {}
        for part, cls in _part_classes(path).items():
            where = str(path / part)
            kwargs: Dict[str, Any] = {"local_files_only": True}
            if part in MODULE_PARTS:
                kwargs["torch_dtype" if part in ("transformer", "vae") else "dtype"] = torch.float32
                variant = _weights_variant(path / part)
                if variant:
                    kwargs["variant"] = variant
            try:
                parts[part] = cls.from_pretrained(where, **kwargs)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
                raise _part_error(path, part, err) from err
        return _bundle(parts, str(path))

    def load_skeleton(self, pretrained: str, *, config: Optional[str] = None,
                      prediction_type: Optional[str] = None) -> Optional[ModelBundle]:
        """The same modules built from their configs on the ``meta`` device (no weight read);
        tokenizers and the scheduler are real. Errors are those :meth:`load` would raise."""
        from transformers import AutoConfig

        _check_prediction_type(prediction_type)
        path = _folder(pretrained, config)
        parts: Dict[str, Any] = {}
        for part, cls in _part_classes(path).items():
            where = str(path / part)
            try:
                if part.startswith("tokenizer"):
                    parts[part] = cls.from_pretrained(where, local_files_only=True)
                elif part == "scheduler":
                    parts[part] = cls.from_config(cls.load_config(where))
                elif hasattr(cls, "load_config"):  # diffusers models
                    with torch.device("meta"):
                        parts[part] = cls.from_config(cls.load_config(where))
                else:  # transformers models
                    model_config = AutoConfig.from_pretrained(where, local_files_only=True)
                    with torch.device("meta"):
                        parts[part] = cls(model_config)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
                raise _part_error(path, part, err) from err
        return _bundle(parts, str(path))

    def latent_factor(self, models: ModelBundle) -> int:
        """Pixels per latent side: 2 ** (VAE down blocks - 1), 8 for FLUX's VAE."""
        return 2 ** (len(models.vae.config.block_out_channels) - 1)

    def size_multiple(self, models: ModelBundle) -> int:
        """What bucket sides must be multiples of: the latent factor times 2 (2x2 latent packing), 16."""
        return self.latent_factor(models) * 2

    # ------------------------------------------------------------------ prompts
    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> FluxPromptEncoder:
        """:class:`FluxPromptEncoder` (T5 hidden states + CLIP pooled output); ``clip_skip`` must be 0."""
        if clip_skip:
            raise ConfigError(
                f"model.clip_skip = {clip_skip} does not apply to FLUX: it uses only CLIP's pooled output (and T5's "
                "last hidden states), as FluxPipeline does; leave model.clip_skip out or set it to 0."
            )
        return FluxPromptEncoder(models.tokenizer, models.text_encoder, models.tokenizer_2, models.text_encoder_2,
                                 max_sequence_length=self.config.max_sequence_length)

    # ------------------------------------------------------------------ the objective
    def shift_for(self, models: ModelBundle, latent_height: int, latent_width: int) -> float:
        """The static time shift for latents of this size: the configured number, or for "dynamic"
        ``exp(mu)`` with FLUX's ``mu`` for the packed token count (the scheduler config's
        base/max shift and sequence lengths; FLUX.1's are kohya's flux_shift constants)."""
        shift = self.config.shift
        if shift != DYNAMIC_SHIFT:
            return float(shift)
        sched = getattr(models.scheduler, "config", {}) or {}
        get = sched.get if hasattr(sched, "get") else (lambda key, default: default)
        mu = fm.flux_shift(
            (latent_height // 2) * (latent_width // 2),
            base_seq_len=get("base_image_seq_len", 256), max_seq_len=get("max_image_seq_len", 4096),
            base_shift=get("base_shift", 0.5), max_shift=get("max_shift", 1.15),
        )  # fmt: skip
        return math.exp(mu)

    def sigmas_for(self, models: ModelBundle, latents: torch.Tensor, sample_ids: Sequence[int], *,
                   seed: int, step: int) -> torch.Tensor:
        """One noise level per sample, float32 on the latents' device."""
        cfg = self.config
        return fm.sample_sigmas(
            sample_ids, seed=seed, step=step, scheme=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
            shift=self.shift_for(models, latents.shape[-2], latents.shape[-1]), device=latents.device,
        )  # fmt: skip

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
        (unpacked to the latents' shape) and its target ``noise - latents``."""
        _refuse_ddpm_options(train)
        b, _, h, w = latents.shape
        noise = fm.draw_noise(latents, sample_ids, seed=seed, step=step)
        sigmas = self.sigmas_for(models, latents, sample_ids, seed=seed, step=step)
        noisy = fm.noisy_latents(latents, noise, sigmas)
        transformer = models.transformer
        with torch.set_grad_enabled(train_text), autocast():
            text = encoder(list(batch["prompts"]))
        with autocast():
            pred = transformer(**self.transformer_inputs(models, noisy, sigmas, text), return_dict=False)[0]
        pred = fm.unpack_latents(pred, h, w)
        target = fm.velocity_target(latents, noise)
        weights = fm.loss_weights(sigmas, self.config.loss_weighting)
        return TrainingPrediction(pred=pred, target=target, timesteps=sigmas, snr=None, weights=weights)

    def transformer_inputs(self, models: ModelBundle, noisy: torch.Tensor, sigmas: torch.Tensor,
                           text: Any) -> Dict[str, Any]:
        """The transformer's keyword arguments for noisy latents [B, C, h, w] at noise levels ``sigmas``."""
        b, _, h, w = noisy.shape
        device = noisy.device
        hidden = text.hidden.to(device)
        guidance = None
        if getattr(models.transformer.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(self.config.guidance), device=device, dtype=torch.float32)
        return {
            "hidden_states": fm.pack_latents(noisy),
            "timestep": sigmas.to(device),  # FLUX multiplies by 1000 inside
            "guidance": guidance,
            "pooled_projections": text.pooled.to(device),
            "encoder_hidden_states": hidden,
            "txt_ids": fm.text_ids(hidden.shape[1], device, noisy.dtype),
            "img_ids": fm.latent_image_ids(h, w, device, noisy.dtype),
        }

    # ------------------------------------------------------------------ images
    def render(self, models: ModelBundle, encoder: Any, params: Any, *,
               autocast: Callable[[], ContextManager]) -> Any:
        """One PIL image through diffusers' ``FluxPipeline`` with the models as they are now.

        The prompt is encoded by ``encoder`` (the run's prompt encoder, with whatever adapters
        wrap it); ``params.cfg`` is the distilled guidance scale of dev-style models (schnell-style
        models ignore it); FLUX has no negative prompt, so ``params.negative_prompt`` and
        ``params.scheduler`` are ignored (the sampler is the model's flow-matching Euler). The VAE
        decodes outside autocast, in its own precision.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from hcp_core.generation.params import MAX_SEED
        from hcp_core.generation.render import vae_decode_without_autocast

        if not 0 <= params.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, got {params.seed}")
        multiple = self.size_multiple(models)
        if params.width % multiple or params.height % multiple:
            raise UserError(f"image size {params.width}x{params.height}: FLUX renders sizes whose sides are multiples "
                            f"of {multiple} (VAE factor x 2x2 packing); change [sample].size")  # fmt: skip
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.scheduler.config), vae=models.vae,
            text_encoder=models.text_encoder, tokenizer=models.tokenizer, text_encoder_2=models.text_encoder_2,
            tokenizer_2=models.tokenizer_2, transformer=models.transformer,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with _modules_in_eval([models.transformer]), torch.no_grad(), autocast(), vae_decode_without_autocast(models.vae):
            text = encoder([params.prompt])
            result = pipe(
                prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled,
                num_inference_steps=params.steps, guidance_scale=params.cfg, width=params.width,
                height=params.height, generator=generator, output_type="pil",
                max_sequence_length=text.hidden.shape[1],
            )  # fmt: skip
        return result.images[0]


def _refuse_ddpm_options(train: Any) -> None:
    """[train] options of the DDPM objective that FLUX cannot honour: a clear error, not silence."""
    if getattr(train, "min_snr_gamma", None):
        raise ConfigError("train.min_snr_gamma applies to the DDPM families (sd, sdxl); FLUX trains with flow "
                          "matching: use model.family.loss_weighting (\"sigma_sqrt\" or \"cosmap\") instead, or remove it.")
    if getattr(train, "noise_offset", 0.0):
        raise ConfigError("train.noise_offset applies to the DDPM families (sd, sdxl) only; remove it for FLUX.")


def build_family(config: Any) -> FluxFamily:
    """Factory of the ``flux`` component."""
    return FluxFamily(config)
