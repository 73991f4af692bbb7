"""A model through its family: what ``hcp generate`` and ``hcp tools merge-lora`` load with.

The family (hook ``hcp_register_models``) is named (``--family NAME``) or detected as for a
pipeline's ``model.family``: from a diffusers folder's ``model_index.json`` class, or the family
that reads lone checkpoint files. It is built with its config class's defaults and found only
through the registry (the core never imports a family's module by name).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from ..errors import ConfigError, UserError
from ..interfaces import ModelBundle
from ..registry import Component, Registry

def family_component(
    pretrained: str,
    *,
    registry: Registry,
    family: Optional[str] = None,
    config: Optional[str] = None,
    option: str = "--family",
) -> Component:
    """The registered family that reads ``pretrained`` (no weights read).

    ``family`` names it (an unknown name lists the known ones); otherwise it is detected from the
    folder's ``model_index.json`` (``config``: the folder describing a single file). A path that
    does not exist is a :class:`~hcp_core.models.loading.ModelLoadError`; a folder no family
    reads is a :class:`UserError` that tells the user to give ``option``.
    """
    from ..config.pipeline import detect_family
    from .loading import ModelLoadError, missing_model_message

    if family is not None:
        return registry.models.get(family)
    path = os.path.expanduser(str(pretrained))
    if not os.path.exists(path):
        raise ModelLoadError(missing_model_message(str(pretrained)))
    try:
        name = detect_family(registry, path, config, ".")
    except ConfigError as exc:
        text = str(exc)
        if text.startswith("model.family: "):
            text = text[len("model.family: "):]
        raise UserError(text.replace("set model.family", f"give {option} NAME")) from None
    if name is None:
        # A folder without a readable model_index.json: the lone-file family's loader names the
        # problem (a missing or damaged model_index.json), as hcp always has.
        comp = registry.family_for("single_file")
        if comp is None:
            raise UserError(f"{pretrained}: no installed model family reads this model; give {option} NAME "
                            f"(known: {', '.join(registry.models.names()) or 'none'})")
        return comp
    return registry.models.get(name)


def build_family(component: Component) -> Any:
    """The :class:`~hcp_core.interfaces.ModelFamily` of ``component``, with its config's defaults
    (what a pipeline's ``model.family = "NAME"`` builds)."""
    return component.build(component.config())


def load_with_family(
    pretrained: str,
    *,
    registry: Optional[Registry] = None,
    family: Optional[str] = None,
    config: Optional[str] = None,
    prediction_type: Optional[str] = None,
    option: str = "--family",
) -> Tuple[Any, ModelBundle]:
    """``(family, models)``: the family that reads ``pretrained`` (named by ``family`` or detected)
    and the model it loads (frozen, fp32), as training loads it.

    ``registry`` defaults to the process-wide one; ``config`` is a local diffusers folder describing
    a single-file model; ``prediction_type`` overrides the model's where the family allows it.
    """
    from ..plugins import get_registry

    registry = registry if registry is not None else get_registry()
    fam = build_family(family_component(pretrained, registry=registry, family=family, config=config, option=option))
    return fam, fam.load(str(pretrained), config=config, prediction_type=prediction_type)


def family_of(models: ModelBundle, *, registry: Optional[Registry] = None) -> Any:
    """The family registered under ``models.kind``, built with its config's defaults: what renders
    or writes a bundle when the family that loaded it is not at hand (a script, a test).

    ``registry`` defaults to the process-wide one; a kind no installed family is named after is a
    :class:`UserError`.
    """
    from ..plugins import get_registry

    registry = registry if registry is not None else get_registry()
    kind = str(getattr(models, "kind", "sd"))
    if kind not in registry.models.names():
        raise UserError(f"no installed model family is named {kind!r} (the model's kind); installed: "
                        f"{', '.join(registry.models.names()) or 'none'}")  # fmt: skip
    return build_family(registry.models.get(kind))
