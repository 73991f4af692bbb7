"""Parts shared by the tiny flow-matching transformer demos (SD3.5 in :mod:`.sd3`, FLUX.1 in :mod:`.flux`).

Both families pair CLIP text encoders (from :mod:`.model`) with a T5 encoder, encode images with a
16-channel VAE whose latents are shifted and scaled, and are trained and sampled with a
flow-matching Euler schedule. This module builds those parts, tiny and offline:

* a T5-style tokenizer: a SentencePiece-like Unigram model (``▁`` marks a word start) over the
  demo vocabulary, ``<pad>`` = 0, ``</s>`` = 1 (appended to every text), ``<unk>`` = 2, as T5's;
* a T5 v1.1-style encoder (gated-GELU feed-forward, untied embeddings), under a megabyte;
* the 16-channel VAE, its shift and scaling factors calibrated on demo images the way the real
  ones were (mean and 1 / std of the latents), so noised latents behave as on a real model;
* ``FlowMatchEulerDiscreteScheduler`` configured as each family ships it.
"""
from __future__ import annotations

import contextlib
import math
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

from .model import _corpus, _seeded, demo_latents, tiny_vae

T5_PAD_TOKEN = "<pad>"
T5_EOS_TOKEN = "</s>"
T5_UNK_TOKEN = "<unk>"
#: What real T5 tokenizers (FLUX's, SD3's) declare; pipelines pass their own shorter max lengths.
T5_MAX_LENGTH = 512
#: SentencePiece's word-start marker.
_WORD_START = "\u2581"

#: The schedulers' configs as FLUX.1-dev, FLUX.1-schnell and SD3.5 ship them.
FLUX_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)
FLUX_SCHNELL_SCHEDULER = dict(FLUX_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
SD3_SCHEDULER = dict(FLUX_SCHEDULER, use_dynamic_shifting=False)


def train_demo_t5_vocab(corpus: Sequence[str] | None = None) -> List[Tuple[str, float]]:
    """A Unigram vocabulary for the T5 demo tokenizer: ``[(piece, log-probability), ...]``.

    Estimated on ``corpus`` (default: the CLIP demo tokenizer's) by counting: every corpus word is
    one piece ``▁word`` scored by its log frequency, and every printable ASCII character is a
    low-scored fallback piece (plain and word-initial), so any ASCII text segments without
    ``<unk>``. Deterministic by construction, unlike ``tokenizers``' Unigram trainer, whose result
    varies between processes on a corpus this small.
    """
    texts = list(corpus if corpus is not None else _corpus())
    words = Counter(w for text in texts for w in text.replace(",", " , ").split())
    total = sum(words.values())
    vocab: List[Tuple[str, float]] = [(T5_PAD_TOKEN, 0.0), (T5_EOS_TOKEN, 0.0), (T5_UNK_TOKEN, 0.0)]
    vocab.append((_WORD_START, math.log(0.5 / total)))
    for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        vocab.append((_WORD_START + word, math.log(count / total)))
    seen = {piece for piece, _ in vocab}
    rare = math.log(0.01 / total)  # a word spelt out never beats the word itself
    for char in string.ascii_letters + string.digits + string.punctuation:
        for piece in (_WORD_START + char, char):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, rare))
    return vocab


def save_demo_t5_tokenizer(out_dir: Path, vocab: Sequence[Tuple[str, float]] | None = None) -> Any:
    """Write a T5 tokenizer (``tokenizer.json`` + config) for ``vocab`` to ``out_dir``; return it loaded.

    ``T5TokenizerFast.from_pretrained(out_dir)`` reads it back; encoding ends with ``</s>`` and pads
    with ``<pad>``, as T5's does.
    """
    from transformers import T5TokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = T5TokenizerFast(
        vocab=[tuple(item) for item in (vocab if vocab is not None else train_demo_t5_vocab())],
        extra_ids=0,  # no span-corruption sentinels: an encoder-only text model never sees them
        model_max_length=T5_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(out_dir))
    return T5TokenizerFast.from_pretrained(str(out_dir))


def tiny_t5_encoder(vocab_size: int, *, d_model: int = 32, layers: int = 2) -> Any:
    """A T5 v1.1-style encoder (what FLUX and SD3 use, there with d_model 4096), tiny."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=max(1, d_model // 8),
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def calibrated_flow_vae(seed: int) -> Any:
    """A 16-channel :func:`~.model.tiny_vae` (no quant convs, as SD3's and FLUX's) drawn under
    ``seed``, its ``shift_factor`` and ``scaling_factor`` fitted to demo images' latents."""
    with _seeded(seed):
        vae = tiny_vae(latent_channels=16, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    latents = demo_latents(vae)
    shift = round(float(latents.mean()), 5)
    scale = round(1.0 / float((latents - shift).std()), 5)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def flow_match_scheduler(**config: Any) -> Any:
    """``FlowMatchEulerDiscreteScheduler`` over 1000 training timesteps with ``config``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' log level at "error" for the block (importing diffusers' SD3 / FLUX pipelines
    warns that torchvision, which hcp never needs, is missing), put back afterwards."""
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(before)


def diffusers_pipeline_class(name: str) -> Any:
    """diffusers' pipeline class ``name`` ("FluxPipeline", "StableDiffusion3Pipeline"), imported quietly."""
    with _quiet_transformers():
        import diffusers

        return getattr(diffusers, name)


def new_flow_folder(out_dir: str | Path) -> Path:
    """``out_dir``, created."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out

