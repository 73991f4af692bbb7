"""Prompt emphasis (``model.prompt_emphasis``): webui-style ``(word:1.2)`` weights in prompts.

Syntax (as AUTOMATIC1111's webui and HCP-Diffusion read it):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest
  and multiply (``((text))`` = 1.21);
* ``(text:1.5)`` multiplies by 1.5 instead of 1.1;
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a closing bracket with no
  opening one is literal text, and a bracket left open runs to the end of the prompt;
* the brackets and ``:1.5`` are removed from the text that gets tokenized.

Encoding: each token's hidden state (every channel) is multiplied by its weight, then each
prompt's hidden states are rescaled so that their mean over all positions and channels is what
it was before weighting. That is HCP-Diffusion's rule (per prompt); webui takes the mean over
the whole batch of one 77-token chunk instead, which makes a prompt's encoding depend on the
other prompts of its batch. The arithmetic runs in float32.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, List, Tuple

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: What ``(text)`` multiplies by and ``[text]`` divides by.
BRACKET_FACTOR = 1.1
_ESCAPABLE = "()[]\\"
#: ``:1.5)``, the end of an explicitly weighted round bracket.
_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


def parse_emphasis(prompt: str) -> List[Tuple[str, float]]:
    """``prompt`` as (text, weight) runs, the syntax removed, neighbours of equal weight merged.

    ``"a (red:1.5) [cat]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)]``. A
    prompt with no text gives ``[("", 1.0)]``.
    """
    runs: List[List[Any]] = []  # [text, weight], weights scaled as brackets close
    text: List[str] = []
    rounds: List[int] = []  # where each open "(" starts, as an index into runs
    squares: List[int] = []

    def flush() -> None:
        if text:
            runs.append(["".join(text), 1.0])
            text.clear()

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        explicit = _EXPLICIT.match(prompt, i) if c == ":" and rounds else None
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPABLE:
            text.append(prompt[i + 1])
            i += 2
            continue
        if explicit is not None:
            flush()
            scale(rounds.pop(), float(explicit.group(1)))
            i = explicit.end()
            continue
        if c in "([" or (c == ")" and rounds) or (c == "]" and squares):
            flush()
            if c == "(":
                rounds.append(len(runs))
            elif c == "[":
                squares.append(len(runs))
            else:
                scale(rounds.pop() if c == ")" else squares.pop(), BRACKET_FACTOR if c == ")" else 1 / BRACKET_FACTOR)
        else:
            text.append(c)  # unmatched closers, ":" without a weight and every other character
        i += 1
    flush()
    for start in rounds:  # brackets never closed run to the end
        scale(start, BRACKET_FACTOR)
    for start in squares:
        scale(start, 1 / BRACKET_FACTOR)
    merged: List[Tuple[str, float]] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def strip_emphasis(prompt: str) -> str:
    """The text of ``prompt`` without the emphasis syntax (what is tokenized)."""
    return "".join(piece for piece, _ in parse_emphasis(prompt))


def apply_emphasis(hidden: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """``hidden`` [B, L, D] times ``weights`` [B, L] (per position), each row then rescaled so its
    mean over positions and channels is unchanged; in float32, returned in ``hidden``'s dtype.

    Differentiable: a trained text encoder gets its gradients through the weighting.
    """
    import torch

    z = hidden.float()
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(device=z.device, dtype=torch.float32)[..., None]
    after = z.mean(dim=(1, 2), keepdim=True)
    # A zero mean after weighting has nothing to rescale (and would divide by zero).
    ratio = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 1.0)
    return (z * ratio).to(hidden.dtype)


def enable_emphasis(encoder: Any) -> Any:
    """Switch emphasis on for a CLIP :class:`~hcp_core.models.text_encoding.PromptEncoder` (SD;
    possibly wrapped for custom words) or an encoder whose ``emphasis_parts`` lists only such
    encoders (SDXL's); a :class:`~hcp_core.errors.ConfigError` for any other (FLUX, SD3: their T5
    has no such rule). Returns ``encoder``."""
    from .text_encoding import PromptEncoder

    parts = getattr(encoder, "emphasis_parts", None) or [encoder]
    if not all(isinstance(part, PromptEncoder) for part in parts):
        raise ConfigError(
            f"model.prompt_emphasis = true: this model's prompt encoder ({type(encoder).__name__}) does not support "
            "emphasis; it works with the sd and sdxl families (CLIP only). Remove model.prompt_emphasis."
        )
    for part in parts:
        part.emphasis = True
    return encoder
