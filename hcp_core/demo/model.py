"""A tiny Stable Diffusion 1.x model, written offline, for demos and tests.

Every part has SD 1.x's architecture and module names (so LoRA, layer selection and clip skip
behave as on a real checkpoint) but only a few MB of randomly initialised weights. The tokenizer
is a CLIP-style byte-level BPE trained here on a small built-in corpus, so prompts split into
real words instead of single bytes.

The parts are built by small functions with the sizes as arguments, so an SDXL variant (two text
encoders, one with a projection) can reuse them.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from ..fileio import apply_default_mode

#: Written into the model folder so tools can tell the demo model from a real one.
MARKER_FILE = "hcp_demo.json"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: BOS + 75 tokens + EOS

# CLIP's pre-tokenizer pattern: special tokens, English contractions, letter runs, single digits,
# and runs of other non-space characters. transformers' CLIPTokenizer uses the same split, so the
# words the BPE is trained on are the words it will later see.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Words that should become single tokens: the demo captions' vocabulary (kept in step with
# hcp_core.demo.dataset) and common prompt words.
_CORPUS_WORDS = """
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle ring cross star shape shapes background foreground
small large big tiny huge bright dark light colour color colorful
a an the of on in at with and or to by for from is are
photo picture image painting drawing sketch illustration render art artwork style
masterpiece best quality high highres detailed realistic anime cartoon simple lowres worst
girl boy man woman person people solo 1girl 1boy face hair eyes long short smile smiling
cat dog bird fish horse animal sofa chair table room house car tree flower grass
sky cloud clouds sun moon night day sunset sunrise water sea river lake mountain forest city street
standing sitting looking viewer outdoors indoors close up full body portrait landscape
my sks pt1 pt2 token word embedding
"""


def _corpus() -> List[str]:
    """Lines the tokenizer is trained on: each word alone, plus caption-like phrases."""
    words = _CORPUS_WORDS.split()
    phrases = [
        "a photo of a red circle on a blue background",
        "green square, yellow background",
        "a painting of a cat sitting on the sofa",
        "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
        "a photo of a dog standing in the grass, blue sky, clouds",
        "landscape, mountain, lake, sunset, highres, detailed",
        "worst quality, low quality, lowres, simple background",
    ]
    return words + phrases


def _byte_alphabet() -> List[str]:
    """The 256 printable characters byte-level BPE maps bytes to, in a fixed order."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def train_demo_tokenizer(corpus: Sequence[str] | None = None) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Train a CLIP-style byte-level BPE on ``corpus``; return ``(vocab, merges)``.

    Like CLIP's vocabulary: lowercase, ``</w>`` marks the end of a word, every single byte exists
    both plain and with ``</w>`` (so no text is ever unknown), then one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every corpus word is one token
        min_frequency=1,
        end_of_word_suffix="</w>",
        initial_alphabet=alphabet,
        # The trainer numbers word-final symbols ("a</w>") in hash-map order, which varies between
        # processes, and breaks ties between equally frequent merges by those numbers. Declaring
        # them up front fixes their numbers, so the merges come out the same in every run.
        special_tokens=[c + "</w>" for c in alphabet],
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus if corpus is not None else _corpus()), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    tokens = alphabet + [c + "</w>" for c in alphabet]
    known = set(tokens)
    for left, right in merges:
        merged = left + right
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def save_demo_tokenizer(
    out_dir: Path, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], *, pad_token: str = EOS_TOKEN
) -> Any:
    """Write ``vocab.json`` + ``merges.txt`` (what every CLIPTokenizer reads) and the tokenizer config.

    Returns the loaded ``CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=MAX_LENGTH, pad_token=pad_token)
    tokenizer.save_pretrained(str(out_dir))  # adds tokenizer_config.json (and tokenizer.json on transformers 5)
    return tokenizer


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for one part's initialisation without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_text_encoder(vocab: Dict[str, int], *, hidden_size: int = 32, layers: int = 4, with_projection: bool = False) -> Any:
    """A CLIP text transformer with SD's 77 positions and quick-GELU, but tiny."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=hidden_size,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def tiny_unet(*, cross_attention_dim: int, sample_size: int = 8, **extra: Any) -> Any:
    """SD 1.x's UNet layout (cross-attention in the upper levels, plain ResNets at the bottom), tiny.

    ``extra`` passes further UNet2DConditionModel options (an SDXL variant adds its time/text
    conditioning there).
    """
    from diffusers import UNet2DConditionModel

    options = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
    )
    options.update(extra)
    return UNet2DConditionModel(**options)


def tiny_vae(*, scaling_factor: float = 0.18215, latent_channels: int = 4, **extra: Any) -> Any:
    """An AutoencoderKL with SD's 4 levels (so 8x downsampling) and 4 latent channels, tiny.

    ``latent_channels`` and ``extra`` (further AutoencoderKL options) let SD3 / FLUX variants
    reuse it with their 16 latent channels, shift factor and no quant convs.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    )


def calibrate_scaling_factor(vae: Any) -> float:
    """1 / std of the latents of a few demo-style images, so scaled latents have unit variance.

    Real SD's 0.18215 was found the same way for its VAE; a random VAE needs its own value or the
    noise schedule would drown (or barely touch) the signal.
    """
    return round(1.0 / float(demo_latents(vae).std()), 5)


def demo_latents(vae: Any) -> Any:
    """The (unscaled) latent means of four 64x64 demo images under ``vae``."""
    import numpy as np
    import torch

    from .dataset import render_sample

    images = [render_sample(i, (64, 64))[0] for i in range(4)]
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean


def ddpm_scheduler(prediction_type: str = "epsilon") -> Any:
    """SD's training noise schedule: 1000 steps of scaled-linear betas from 0.00085 to 0.012."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def new_demo_folder(out_dir: str | Path, prediction_type: str) -> Path:
    """``out_dir``, created, after checking ``prediction_type`` ("epsilon" or "v_prediction")."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def calibrated_vae(seed: int) -> Any:
    """A :func:`tiny_vae` drawn under ``seed`` whose scaling factor suits its random weights."""
    with _seeded(seed):
        vae = tiny_vae()
    vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae))
    return vae


def build_demo_model(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD 1.x diffusers folder to ``out_dir`` without any download; return its path.

    ``StableDiffusionPipeline.from_pretrained(out_dir)`` reads it (no safety checker). The same
    ``seed`` gives identical weights. ``prediction_type`` is "epsilon" or "v_prediction".
    """
    from ..models.pipelines import pipeline_class

    out = new_demo_folder(out_dir, prediction_type)

    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    # Each part gets its own derived seed, so adding a part never changes the others' weights.
    with _seeded(seed * 10 + 1):
        text_encoder = tiny_text_encoder(vocab)
    with _seeded(seed * 10 + 2):
        unet = tiny_unet(cross_attention_dim=text_encoder.config.hidden_size)
    vae = calibrated_vae(seed * 10 + 3)

    pipe = pipeline_class("StableDiffusionPipeline")(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddpm_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_demo_pipeline(pipe, out, kind="sd", seed=seed, prediction_type=prediction_type)


def save_demo_pipeline(
    pipe: Any, out: Path, *, kind: str, seed: int, prediction_type: str, **marker_extra: Any
) -> Path:
    """Write a built demo pipeline as a diffusers folder plus the marker :func:`is_demo_model` reads.

    ``marker_extra`` adds JSON-able fields to the marker (e.g. FLUX's ``guidance``).
    """
    from ..models.pipelines import quiet_progress_bars

    quiet_progress_bars()
    pipe.save_pretrained(str(out), safe_serialization=True)
    # diffusers writes weights through a 0600 temporary file; give them the umask's mode (0644
    # under 022) like every other file, so a web UI running as another user can read them.
    apply_default_mode(out.glob("*/*.safetensors"))  # every part: unet/transformer, vae, text encoders
    marker = {"kind": kind, "seed": seed, "prediction_type": prediction_type, **marker_extra}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def is_demo_model(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`build_demo_model`."""
    return (Path(path) / MARKER_FILE).is_file()
