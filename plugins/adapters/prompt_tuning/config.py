"""What the ``[tokenizer_pt]`` table holds (light: attrs only, imported at plugin discovery)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import attrs

from hcp_core.config.validators import fail, greater_than, in_range, not_blank, one_of

#: How a dynamic DreamArtist guidance scale moves from ``cfg_scale`` (t = 0) to ``cfg_scale_noisy``
#: (the noisiest timestep), as a function of r = t / (T - 1): r, sin(r * pi / 2), 1 - cos(r * pi / 2).
CFG_CURVES = ("linear", "cos", "cos2")
#: Beyond this a guided prediction is mostly the difference of two predictions; training diverges.
MAX_CFG_SCALE = 30.0


def _distinct_names(inst: Any, attribute: attrs.Attribute, value: List["TrainedWord"]) -> None:
    seen: set[str] = set()
    for word in value:
        if word.name.lower() in seen:
            raise ValueError(f"word '{word.name}' is listed twice; give each word one entry", attribute)
        seen.add(word.name.lower())


@attrs.define
class TrainedWord:
    """One trained custom word: ``{ name = "my-cat", lr = 0.003 }``; its own optimizer group."""

    name: str = attrs.field(validator=not_blank)
    lr: float = attrs.field(default=3e-3, validator=greater_than(0))


def _check_pairs(inst: Any, attribute: attrs.Attribute, value: Dict[str, str]) -> None:
    if not value:
        fail(attribute, 'map at least one positive word to its negative word, e.g. negative = { my-cat = "my-cat-neg" }')
    for positive, negative in value.items():
        if not str(positive).strip() or not str(negative).strip():
            fail(attribute, f"word names must not be blank, got {positive!r} = {negative!r}")
        if str(positive).lower() == str(negative).lower():
            fail(attribute, f"'{positive}' is its own negative word; give the negative branch a word of its own")
    negatives = [n.lower() for n in value.values()]
    clash = sorted({n for n in negatives if n in {p.lower() for p in value}} | {n for n in negatives if negatives.count(n) > 1})
    if clash:
        fail(attribute, f"'{clash[0]}' is used twice (as two words' negative, or as both a positive and a negative "
                        "word); each pair needs words of its own")


@attrs.define
class DreamArtistConfig:
    """``[tokenizer_pt.dreamartist]``: train positive and negative words together under
    classifier-free guidance (DreamArtist). The negative prompt of a sample is its prompt with each
    positive word replaced by its negative word; the loss is taken on
    ``pred(negative) + scale * (pred(positive) - pred(negative))``."""

    #: Positive word -> its negative word (both custom words in emb_dir; list both in train).
    negative: Dict[str, str] = attrs.field(validator=_check_pairs)
    #: The guidance scale (at t = 0 when cfg_scale_noisy is set).
    cfg_scale: float = attrs.field(default=3.0, validator=in_range(0, MAX_CFG_SCALE, low_open=True))
    #: Dynamic guidance: the scale at the noisiest timestep (None: cfg_scale at every timestep).
    cfg_scale_noisy: Optional[float] = attrs.field(default=None, validator=in_range(0, MAX_CFG_SCALE, low_open=True))
    #: How the scale moves between the two (see CFG_CURVES).
    cfg_curve: str = attrs.field(default="linear", validator=one_of(CFG_CURVES))


@attrs.define
class PromptTuningConfig:
    """Custom words from emb_dir, usable by name in prompts; train = [{ name, lr }] trains some of them."""

    #: Folder of custom-word files (.pt / .safetensors); relative to the working directory.
    emb_dir: str = attrs.field(default="embs", validator=not_blank)
    #: After training, write the trained vectors back into the words' files in emb_dir.
    replace: bool = False
    train: List[TrainedWord] = attrs.field(factory=list, validator=_distinct_names)
    #: DreamArtist (positive and negative words trained together with guidance); None: off.
    dreamartist: Optional[DreamArtistConfig] = None
