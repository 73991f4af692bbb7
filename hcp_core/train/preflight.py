"""``hcp check`` before a run: what the run would find after loading the model, found without
reading its weights, then the data (:func:`hcp_core.data.report.check_data`)."""
from __future__ import annotations

import sys
from typing import Any, List, Optional, TextIO, Tuple

from ..data.report import check_data
from ..errors import UserError
from ..interfaces import Size


def check_model(pipeline: Any, out: TextIO = sys.stdout) -> Tuple[bool, Optional[int], Optional[int], Optional[Size]]:
    """What ``hcp check`` prints for the model: the errors ``hcp run`` would meet after loading it.

    The model is built from its configs on the ``meta`` device (no weight is read, so this takes
    seconds even for SDXL), then ``model.clip_skip`` is checked and every adapter is attached to
    it: a layer pattern that matches nothing, a LoRA ``init_from`` file or a custom-word file
    that does not fit are reported with the very message the run would give. Returns (ok, the
    latent factor, the bucket size multiple and the native (w, h) resolution, all None when the
    model could not be built).
    """
    import torch

    from ..data.size_checks import native_size
    from ..interfaces import AdapterContext
    from .setup import build_adapters, check_parts, model_family, size_multiple

    model = pipeline.model
    try:
        family = model_family(pipeline)
        check_parts(pipeline, family)
        models = family.load_skeleton(model.pretrained, prediction_type=model.prediction_type, config=model.config)
    except UserError as exc:
        print(f"model: ERROR: {exc}", file=out)
        return False, None, None, None
    if models is None:
        print(f"model: note: {model.pretrained} is a single-file checkpoint without model.config; its layers are "
              "checked only when the run loads it", file=out)
        return True, None, None, None
    errors: List[str] = []
    try:
        encoder = family.prompt_encoder(models, clip_skip=model.clip_skip)
        if model.prompt_emphasis:
            from ..models.emphasis import enable_emphasis

            enable_emphasis(encoder)
    except UserError as exc:
        errors.append(str(exc))
    context = AdapterContext(exp_dir=str(pipeline.exp_dir), base_dir=pipeline.base_dir, clip_skip=model.clip_skip,
                             seed=pipeline.seed, extra={"max_steps": pipeline.train.max_steps},
                             default_layers=getattr(family, "default_layers", None))
    try:
        adapters = build_adapters(pipeline, context)
    except UserError as exc:
        errors.append(str(exc))
        adapters = []
    for name, adapter in adapters:
        try:
            with torch.device("meta"):  # whatever an adapter creates stays shapes only
                adapter.attach(models)
        except UserError as exc:
            errors.append(str(exc))
        except Exception as exc:  # an adapter that needs real weights to attach: the run will tell
            print(f"model: note: adapter {name} could not be checked without loading the weights "
                  f"({type(exc).__name__}: {exc})", file=out)
    for message in errors:
        print(f"model: ERROR: {message}", file=out)
    if not errors:
        print(f"model: OK: {model.pretrained} ({models.kind}); layer patterns and clip_skip fit it", file=out)
    factor = family.latent_factor(models)
    return not errors, factor, size_multiple(family, models), native_size(models, factor)


def check_pipeline(
    pipeline: Any,
    out: TextIO = sys.stdout,
    *,
    registry: Any = None,
    strict: bool = False,
    verify_images: bool = True,
    check_model_layers: bool = True,
) -> bool:
    """What ``hcp check`` prints: the model check (:func:`check_model`, unless
    ``check_model_layers`` is False), then :func:`~hcp_core.data.report.check_data` with the
    model's latent factor. Returns False when anything would stop the run (see check_data's
    ``strict``)."""
    from .precision import check_machine

    ok, factor, multiple, native = check_model(pipeline, out) if check_model_layers else (True, None, None, None)
    try:  # mixed precision, VAE dtype and compile backend usable on this machine
        check_machine(pipeline.model)
    except UserError as exc:
        print(f"model: ERROR: {exc}", file=out)
        ok = False
    prepared: dict = {}
    data_ok = check_data(pipeline, out, registry=registry, strict=strict, verify_images=verify_images,
                         latent_factor=factor, size_multiple=multiple, native_size=native, prepared_out=prepared)
    if pipeline.train.epochs is not None and len(prepared) == len(pipeline.data):
        print(run_length(pipeline, prepared), file=out)
    return ok and data_ok


def run_length(pipeline: Any, prepared: Any) -> str:
    """The line ``hcp check`` prints for ``train.epochs``: how many optimizer steps they come to."""
    from .epochs import epoch_plan

    try:
        plan = epoch_plan(pipeline.train, {name: sum(s.batches for s in p.stats()) for name, p in prepared.items()})
    except UserError as exc:
        return f"train: ERROR: {exc}"
    return (f"train: {plan.epochs} epoch(s) of data.{plan.dataset} ({plan.batches} batches each, gradient_accumulation "
            f"{plan.accumulation}) = {plan.total_steps} optimizer steps on one process (N processes split each "
            "epoch's batches N ways)")
