"""The hooks an hcp plugin implements. This is the one file a plugin author must read.

Every hook is a *register* hook: it runs once at start-up and receives the typed registry of one
component family. A plugin registers components with ``registry.add(name, config=..., factory=...)``:

- ``name``: what users write as ``type = "name"`` in a TOML table;
- ``config``: a light ``attrs`` class (cheap to import) whose fields are that table's keys,
  validated by cattrs; unknown keys are errors with a did-you-mean;
- ``factory``: ``"module:attr"``, imported only when a pipeline uses the component, so heavy
  imports (torch, diffusers) never slow ``hcp --help``.

What each factory is called with and must return is spelled out per hook below; the returned
objects do the per-sample and per-step work as plain Python (see :mod:`hcp_core.interfaces`).

A plugin module exposes functions decorated with :data:`hookimpl` and is declared in its
package's ``pyproject.toml``::

    [project.entry-points.hcp]
    my_plugin = "my_package.hcp_plugin"
"""
from __future__ import annotations

import pluggy

from .registry import FamilyRegistry

PROJECT = "hcp"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate your plugin's hook functions with this.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hcp_register_data_sources(registry: FamilyRegistry) -> None:
    """Register data sources: where a dataset's images and captions come from.

    Factory: ``factory(config, *, context: SourceContext) -> DataSource``; the object's
    ``scan() -> ScanResult`` lists :class:`~hcp_core.interfaces.ImageRecord` items (paths, header
    sizes, captions, masks, templates, text transforms, repeat) and the problems it found.
    Used as ``[[data.<dataset>.sources]]`` with ``type = "<name>"``.

    .. versionadded:: 0.1
    """


@hookspec
def hcp_register_buckets(registry: FamilyRegistry) -> None:
    """Register buckets: how images are grouped into same-size batches and cropped.

    Factory: ``factory(config, *, context: BucketContext) -> Bucket`` with ``fit(sizes)`` (the
    bucket sizes for a data set), ``assign(size, buckets)`` and ``crop(size, bucket, rng)``
    returning a :class:`~hcp_core.interfaces.CropPlan`, plus a ``deterministic`` flag.
    Used as ``data.<dataset>.bucket = { type = "<name>", ... }``.

    .. versionadded:: 0.1
    """


@hookspec
def hcp_register_text_transforms(registry: FamilyRegistry) -> None:
    """Register text transforms: steps that turn a template and a caption into a prompt.

    Factory: ``factory(config) -> TextTransform``, a picklable callable
    ``(parts: PromptParts, rng: random.Random) -> PromptParts``. Used in a source's
    ``text_transforms = [{ type = "<name>", ... }]``, applied in the listed order.

    .. versionadded:: 0.1
    """


@hookspec
def hcp_register_adapters(registry: FamilyRegistry) -> None:
    """Register adapters: what a run trains (LoRA, layer fine-tuning, prompt tuning, yours).

    An adapter also claims top-level pipeline sections with ``sections={"lora_unet": "unet"}``;
    each section is a table or an array of tables of the adapter's config class.
    Factory: ``factory(sections: dict[str, list[config]], *, context: AdapterContext) -> Adapter``
    with ``attach(models) -> param groups``, ``trainable_state()``, ``load_trainable_state()``
    and ``export(models, out_dir, step)``.

    .. versionadded:: 0.1
    """


@hookspec
def hcp_register_losses(registry: FamilyRegistry) -> None:
    """Register losses: how a prediction is scored against its target.

    Factory: ``factory(config) -> Loss``, a callable ``(pred, target, inputs: LossInputs)``
    returning one loss per sample (shape ``[B]``). ``inputs.weight_map`` carries attention-mask
    weights when the data has masks. Used as ``train.loss = { type = "<name>", ... }``.

    .. versionadded:: 0.1
    """


@hookspec
def hcp_register_models(registry: FamilyRegistry) -> None:
    """Register model families: what differs between architectures (SD, SDXL, and yours).

    ``registry.add(name, config=..., factory=..., detect=("MyPipeline",))``: ``detect`` lists the
    diffusers pipeline classes (``model_index.json``'s ``_class_name``) whose folders the family
    reads, so ``model.family`` can be left out; ``"single_file"`` claims lone checkpoint files.
    Factory: ``factory(config) -> ModelFamily`` (see :class:`~hcp_core.interfaces.ModelFamily`)
    with ``load``, ``load_skeleton``, ``latent_factor``, ``prompt_encoder``,
    ``training_prediction`` and ``render``, and a ``parts`` tuple naming the model parts adapters
    may target. Used as ``model.family = "<name>"`` or ``{ type = "<name>", ... }``.

    .. versionadded:: 0.2
    """


@hookspec
def hcp_register_optimizers(registry: FamilyRegistry) -> None:
    """Register optimizers: what updates the trained tensors from their gradients.

    Factory: ``factory(config, *, params: list[dict]) -> Optimizer``, a ``torch.optim.Optimizer``
    over ``params`` (parameter groups, each with its own ``lr`` and a ``name``), whose
    ``state_dict()`` holds everything a resumed run needs. A schedule-free optimizer (one that
    trains on other weights than it exports) has ``train()``/``eval()`` methods and a config
    class with ``schedule_free = True``: hcp calls ``eval()`` around exports and samples and
    refuses a varying lr schedule with it. A config class may name the packages it needs as
    ``requires = (("module", "pip name"), ...)``: a missing one is a clear error before the model
    loads (trackers and schedulers may do the same). Used as ``train.optimizer = { type = "<name>", ... }``
    or ``train.optimizer = "<name>"``.

    .. versionadded:: 0.3
    """


@hookspec
def hcp_register_schedulers(registry: FamilyRegistry) -> None:
    """Register learning-rate schedulers: how each group's lr changes over the run.

    Factory: ``factory(config, *, optimizer, total_steps: int) -> LRScheduler``, a
    ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step, scaling every
    group's own lr; its ``state_dict()`` goes into checkpoints. A config class may define a
    ``constant`` property (true when the lr never changes), which schedule-free optimizers need.
    Used as ``train.scheduler = { type = "<name>", ... }`` or ``train.scheduler = "<name>"``.

    .. versionadded:: 0.3
    """


@hookspec
def hcp_register_trackers(registry: FamilyRegistry) -> None:
    """Register trackers: where the main process logs scalars and sample images.

    Factory: ``factory(config, *, context: TrackerContext) -> Tracker`` with
    ``add_scalar(tag, value, step)``, ``add_image(tag, image, step)`` (an ``HxWx3`` uint8 array),
    ``flush()`` and ``close()`` (see :class:`~hcp_core.interfaces.Tracker`); ``requires`` as for
    optimizers. Only the main process tracks. Used in ``train.trackers = ["<name>", { type = "<name>", ... }]``.

    .. versionadded:: 0.3
    """
