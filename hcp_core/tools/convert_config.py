"""``hcp tools convert-config OLD.yaml [-o NEW.toml]``: an HCP-Diffusion training YAML as an hcp pipeline.

The YAML is read as HCP-Diffusion read it (:mod:`.hcpdiff_yaml`: the ``_base_`` chain, OmegaConf
merging, ``${...}`` interpolations), then every key hcp has an equivalent for is mapped (the table
is in docs/migration.md). ``_target_`` import paths are never imported: the known ones (buckets,
optimizers, losses, tag transforms) map to registry names, any other is reported. Every key that
was not converted is named, with its value and, where one is known, what to do instead: printed
as warnings and written as a comment block at the top of the TOML.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import attrs

from ..config.toml_write import dumps
from ..errors import UserError
from .hcpdiff_yaml import Resolver, arithmetic, dotted, load_hcpdiff_config

#: ``_target_`` of HCP-Diffusion's optimizers -> hcp optimizer name.
OPTIMIZERS = {
    "torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
    "bitsandbytes.optim.AdamW8bit": "adamw8bit", "bitsandbytes.optim.adamw.AdamW8bit": "adamw8bit",
    "lion_pytorch.Lion": "lion", "transformers.optimization.Adafactor": "adafactor",
    "transformers.Adafactor": "adafactor", "prodigyopt.Prodigy": "prodigy",
    "schedulefree.AdamWScheduleFree": "adamw_schedulefree",
}
#: Scheduler names hcp may lack (older registries): the closest it has.
SCHEDULER_FALLBACK = {"constant_with_warmup": "constant", "cosine_with_restarts": "cosine", "polynomial": "linear"}
#: Losses that are hcp's mse (which applies attention masks itself).
MSE_LOSSES = {"torch.nn.MSELoss", "hcpdiff.loss.MSELoss"}
MIN_SNR_LOSSES = {"hcpdiff.loss.MinSNRLoss"}
#: Dataset classes whose data hcp's image_folder source and the model family cover.
DATASETS = {"hcpdiff.data.TextImagePairDataset", "hcpdiff.data.CropInfoPairDataset"}
SDXL_DATASET = "hcpdiff.data.CropInfoPairDataset"
DEFAULT_IMAGE_TRANSFORMS = ["torchvision.transforms.ToTensor", "torchvision.transforms.Normalize"]
TAG_SHUFFLE, TAG_DROPOUT, TEMPLATE_FILL = ("hcpdiff.utils.caption_tools.TagShuffle",
                                           "hcpdiff.utils.caption_tools.TagDropout",
                                           "hcpdiff.utils.caption_tools.TemplateFill")
#: The original's bucket defaults: sides in multiples of step_size 8, from_ratios' ratio_max 4.
ORIGINAL_BUCKET_STEP = 8
ORIGINAL_MAX_RATIO = 4.0
#: Keys whose value, when it is this one (None: any value), is what hcp does anyway: converted silently.
SAME_AS_HCP: Dict[str, Any] = {
    "ckpt_type": "safetensors", "allow_tf32": False, "model.enable_xformers": True, "model.clip_final_norm": True,
    "model.force_cast_precision": False, "model.ema_text_encoder": 0, "train.set_grads_to_none": False,
    "train.scale_lr": False, "train.scale_lr_pt": False, "train.cfg_scale": "1.0", "train.loss.type": "eps",
    "train.loss.criterion.reduction": "none", "model.tokenizer_repeats": None,
}
#: What to do instead, for keys hcp has no setting for.
HINTS = {
    "train.scale_lr": "the original multiplied each lr by the total batch size; hcp uses lr as written, so multiply it yourself",
    "train.scale_lr_pt": "as train.scale_lr, for the word embeddings' lr",
    "train.resume": "resume with `hcp run PIPELINE.toml --resume [CHECKPOINT]`",
    "train.cfg_scale": "DreamArtist's negative branch has no hcp equivalent",
    "model.ema_text_encoder": "hcp's train.ema averages every trained weight (set from model.ema_unet)",
    "model.clip_final_norm": "hcp applies the final layer norm after clip_skip as each family expects (SD: yes, SDXL: no)",
    "allow_tf32": "hcp's model.allow_tf32 takes true or false",
    "vis_info": "preview prompts: use a [sample] table (docs/generation.md)",
    "previewer": "preview images: use a [sample] table (docs/generation.md)",
}


@attrs.frozen
class Note:
    """A key that was not converted (or converted with a difference worth reading)."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@attrs.frozen
class Conversion:
    """The pipeline as plain data (ready for TOML) and what could not be mapped."""

    pipeline: Dict[str, Any]
    notes: Tuple[Note, ...]
    files: Tuple[Path, ...]

    def toml(self) -> str:
        """The pipeline TOML, led by a comment block naming the sources and every note."""
        head = [f"# Converted by `hcp tools convert-config` from {self.files[0]}"]
        head += [f"#   base: {path}" for path in self.files[1:]]
        head.append("# Check it with `hcp check`; docs/migration.md explains each key and what differs.")
        if self.notes:
            head.append(f"#\n# NOT CONVERTED or converted with a difference ({len(self.notes)}): review these")
            head += ["#   " + " ".join(str(note).splitlines()) for note in self.notes]  # a comment stays one line
        return "\n".join(head) + "\n\n" + dumps(self.pipeline)


def convert_file(path: str | os.PathLike, *, root: Optional[str | os.PathLike] = None, registry: Any = None,
                 now: Optional[float] = None) -> Conversion:
    """Convert the HCP-Diffusion config at ``path`` (``root``: the folder the original ran in)."""
    cfg, resolver, files = load_hcpdiff_config(path, root, now)
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    first = Path(files[0]).parent
    # Where a relative prompt-template file may be: as the original ran (root, folders above the YAML).
    search = [Path(root)] if root is not None else []
    converter = _Converter(cfg, resolver, registry, [*search, Path.cwd(), first, *first.parents])
    return Conversion(converter.convert(), tuple(converter.notes), tuple(files))


# --------------------------------------------------------------------------- values
def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (dict, list, str)) and not value)


def _leaves(node: Any, path: Tuple[Any, ...] = ()) -> Iterator[Tuple[Tuple[Any, ...], Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node and any(isinstance(v, (dict, list)) for v in node):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path, node


def _target(value: Any) -> Optional[str]:
    return value.get("_target_") if isinstance(value, dict) else None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Converter:
    """One conversion: ``take`` marks what it used, ``note`` records what it could not map."""

    def __init__(self, cfg: Dict[str, Any], resolver: Resolver, registry: Any, search_dirs: Sequence[Path] = ()) -> None:
        self.cfg = cfg
        self.search_dirs = list(search_dirs)
        self.registry = registry
        self.references = resolver.references
        self.timestamp = resolver.timestamp()
        self.used: Set[str] = set()
        self.notes: List[Note] = [Note(key, f"left as written: {why}") for key, why in resolver.problems.items()]
        self.used.update(resolver.problems)

    # ------------------------------------------------------------------ reading
    def get(self, key: str) -> Any:
        node: Any = self.cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def take(self, key: str) -> Any:
        """The value at dotted ``key`` (None if absent), marked as converted."""
        self.used.add(key)
        return self.get(key)

    def note(self, key: str, message: str) -> None:
        self.notes.append(Note(key, message))

    def number(self, key: str, value: Any, kind: Callable[[Any], Any] = float) -> Any:
        """A number from YAML: ``1e-4`` arrives as text (YAML 1.1), ``512*512`` from eval helpers."""
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, dict) and _target(value) == "builtins.eval" and value.get("_args_"):
            value = value["_args_"][0]
        try:
            number = value if isinstance(value, (int, float)) else arithmetic(str(value))
            if kind is int and float(number) != int(number):
                raise ValueError(f"not a whole number: {number}")
            return kind(number)
        except (ValueError, TypeError, ZeroDivisionError, OverflowError):
            self.note(key, f"{_short(value)} is not a number; not converted")
            return None

    def option(self, key: str, value: Any) -> Any:
        """An optimizer or scheduler option: true/false as is, numbers (one or a list, as betas) parsed."""
        if isinstance(value, bool):
            return value
        if isinstance(value, list):
            return [self.number(key, v) for v in value]
        return self.number(key, value)

    def keys_of(self, family: str, name: str) -> Optional[List[str]]:
        """TOML keys of component ``name`` of registry ``family``; None when hcp does not know it."""
        from ..config.convert import toml_keys

        fam = self.registry.families.get(family)
        return toml_keys(fam.get(name).config) if fam is not None and name in fam.names() else None

    # ------------------------------------------------------------------ the pipeline
    def convert(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        seed = self.number("seed", self.take("seed"), int)
        if seed is not None:
            out["seed"] = seed
        exp_dir = self.take("exp_dir")
        if exp_dir:  # the original also filled a "{time}" placeholder when the run started
            out["exp_dir"] = str(exp_dir).replace("{time}", self.timestamp)
        out["model"] = self._model()
        out["train"] = self._train()
        sdxl = self._is_sdxl()
        out["data"] = self._data()
        if "epochs" in out["train"] and out["data"] and "epoch_dataset" in self.train_fields():
            out["train"]["epoch_dataset"] = next(iter(out["data"]))  # the original counted epochs on the first
        workers = self.number("train.workers", self.take("train.workers"), int)
        for dataset in out["data"].values() if workers else ():
            dataset["num_workers"] = workers
        self._adapters(out, sdxl)
        self._loggers(out["train"])
        self._silent_defaults()
        self._unmapped()
        return {k: v for k, v in out.items() if v not in ({}, None)}

    @staticmethod
    def train_fields() -> Dict[str, Any]:
        """``[train]``'s keys in this hcp (epochs and trackers are recent)."""
        from ..config.schema import TrainConfig

        return attrs.fields_dict(TrainConfig)

    def _is_sdxl(self) -> bool:
        data = self.get("data") or {}
        if any(isinstance(d, dict) and _target(d) == SDXL_DATASET for d in data.values()):
            return True
        return "xl" in str(self.get("model.pretrained_model_name_or_path") or "").lower()

    def _model(self) -> Dict[str, Any]:
        model: Dict[str, Any] = {}
        pretrained = self.take("model.pretrained_model_name_or_path")
        if pretrained:
            model["pretrained"] = str(pretrained)
            if not Path(str(pretrained)).expanduser().exists() and str(pretrained).count("/") == 1 \
                    and not str(pretrained).startswith((".", "/", "~")):
                self.note("model.pretrained_model_name_or_path",
                          f"{pretrained!r} looks like a Hugging Face Hub id; hcp reads local folders: "
                          f"`huggingface-cli download {pretrained} --local-dir models/...` and set model.pretrained")
        else:
            self.note("model.pretrained_model_name_or_path", "not set; set model.pretrained to a diffusers folder")
        clip_skip = self.number("model.clip_skip", self.take("model.clip_skip"), int)
        if clip_skip:
            model["clip_skip"] = clip_skip
        precision = self.take("mixed_precision")
        if precision is not None:
            if precision in ("no", "fp32"):
                model["mixed_precision"] = "no"
            elif precision in ("fp16", "bf16"):
                # "auto" is what the original meant on a GPU and still runs on a CPU (fp16 needs CUDA).
                model["mixed_precision"] = "auto"
                self.note("mixed_precision", f"{precision!r} became \"auto\" (bf16 on GPUs that have it, fp16 on older "
                                             f"ones, fp32 on a CPU); set model.mixed_precision = \"{precision}\" to force it")
            else:
                self.note("mixed_precision", f"{precision!r}: hcp takes \"no\", \"fp16\", \"bf16\" or \"auto\"")
        if self.get("allow_tf32") is True:
            model["allow_tf32"] = self.take("allow_tf32")
        checkpointing = self.take("model.gradient_checkpointing")
        if isinstance(checkpointing, bool):
            model["gradient_checkpointing"] = checkpointing
        scheduler = self.get("model.noise_scheduler")
        if scheduler is None or str(_target(scheduler) or "").startswith("diffusers.DDPMScheduler"):
            self.used.add("model.noise_scheduler")  # hcp uses the model's own scheduler config
        return model

    # ------------------------------------------------------------------ [train]
    def _train(self) -> Dict[str, Any]:
        train: Dict[str, Any] = {}
        steps = self.number("train.train_steps", self.take("train.train_steps"), int)
        epochs = self.number("train.train_epochs", self.get("train.train_epochs"), int)
        if epochs and "epochs" in self.train_fields():
            self.used.add("train.train_epochs")
            train["epochs"] = epochs
            if steps:
                self.note("train.train_steps", f"{steps} dropped: train_epochs = {epochs} sets the length (hcp takes one of them)")
        elif steps:
            train["max_steps"] = steps
        for old, new in (("gradient_accumulation_steps", "gradient_accumulation"), ("save_step", "save_every")):
            value = self.number(f"train.{old}", self.take(f"train.{old}"), int)
            if value is not None:
                train[new] = value
        norm = self.take("train.max_grad_norm")
        if norm is not None:
            train["max_grad_norm"] = self.number("train.max_grad_norm", norm)
        optimizer = self._optimizer("train.optimizer")
        if optimizer:
            train["optimizer"] = optimizer
        if not (self.get("tokenizer_pt.train") or []):
            # The *_pt settings only concern trained words.
            self.used.update({"train.optimizer_pt", "train.scheduler_pt", "train.scale_lr_pt"})
        elif self.get("train.optimizer_pt") is not None and self._optimizer_pt_differs():
            self.note("train.optimizer_pt", "hcp trains word embeddings with train.optimizer too (each word keeps its "
                                            "own lr from tokenizer_pt.train)")
        self.used.add("train.optimizer_pt")
        scheduler = self._scheduler(steps)
        if scheduler:
            train["scheduler"] = scheduler
        self._loss(train)
        ema = self.number("model.ema_unet", self.take("model.ema_unet"))
        if ema:
            train["ema"] = {"enabled": True, "decay": ema}
        return train

    def _optimizer_pt_differs(self) -> bool:
        main, pt = self.get("train.optimizer") or {}, self.get("train.optimizer_pt") or {}
        return _target(main) != _target(pt) or {k: v for k, v in main.items() if k != "_partial_"} != \
            {k: v for k, v in pt.items() if k != "_partial_"}

    def _optimizer(self, key: str) -> Dict[str, Any]:
        cfg = self.take(key)
        if not isinstance(cfg, dict):
            return {}
        target = _target(cfg)
        name = OPTIMIZERS.get(str(target))
        keys = self.keys_of("optimizers", name) if name else None
        if keys is None:
            self.note(f"{key}._target_", f"{target!r} is not an optimizer hcp knows; train.optimizer stays adamw "
                                         "(see `hcp plugins -v` for the optimizers)")
            return {}
        out: Dict[str, Any] = {"type": name}
        for arg, value in cfg.items():
            if arg in ("_target_", "_partial_"):
                continue
            if arg not in keys:
                self.note(f"{key}.{arg}", f"{_short(value)}: the {name} optimizer of hcp has no such option")
            else:
                out[arg] = self.option(f"{key}.{arg}", value)
        return out

    def _scheduler(self, steps: Optional[int]) -> Dict[str, Any]:
        cfg = self.take("train.scheduler")
        if not isinstance(cfg, dict) or not cfg.get("name"):
            return {}
        name = str(cfg["name"])
        keys = self.keys_of("schedulers", name)
        if keys is None and name in SCHEDULER_FALLBACK:
            self.note("train.scheduler.name", f"{name!r} is not in this hcp; converted to {SCHEDULER_FALLBACK[name]!r}")
            name = SCHEDULER_FALLBACK[name]
            keys = self.keys_of("schedulers", name)
        if keys is None:
            self.note("train.scheduler.name", f"{name!r} is not a scheduler hcp knows; train.scheduler left out")
            return {}
        out: Dict[str, Any] = {"type": name}
        warmup = self.number("train.scheduler.num_warmup_steps", cfg.get("num_warmup_steps"), int)
        if warmup and "warmup_steps" in keys:
            out["warmup_steps"] = warmup
        total = self.number("train.scheduler.num_training_steps", cfg.get("num_training_steps"), int)
        if total and steps and total != steps:
            self.note("train.scheduler.num_training_steps", f"{total}: hcp schedules over the run's length "
                                                            f"({steps} steps), not a separate count")
        for arg, value in (cfg.get("scheduler_kwargs") or {}).items():
            if arg in keys:
                out[arg] = self.option(f"train.scheduler.scheduler_kwargs.{arg}", value)
            else:
                self.note(f"train.scheduler.scheduler_kwargs.{arg}", f"{_short(value)}: hcp's {name} has no such option")
        scheduler_pt = self.get("train.scheduler_pt")
        if scheduler_pt is not None and scheduler_pt != cfg and "train.scheduler_pt" not in self.used:
            self.note("train.scheduler_pt", "hcp uses train.scheduler for the word embeddings too")
        self.used.add("train.scheduler_pt")
        return out

    def _loss(self, train: Dict[str, Any]) -> None:
        target = _target(self.get("train.loss.criterion"))
        if target is None:
            return
        self.used.add("train.loss.criterion._target_")
        self.used.add("train.loss.criterion._partial_")
        if target in MIN_SNR_LOSSES:
            gamma = self.number("train.loss.criterion.gamma", self.take("train.loss.criterion.gamma"))
            if gamma:
                train["min_snr_gamma"] = gamma
        elif target not in MSE_LOSSES:
            self.note("train.loss.criterion._target_", f"{target!r}: hcp's losses are registry names (`hcp plugins`); "
                                                      "the run uses mse")

    # ------------------------------------------------------------------ [data.*]
    def _old_layout(self) -> None:
        """Early HCP-Diffusion configs (examples/locon.yaml) held one dataset's keys directly under
        ``data`` (the image folder in ``bucket.img_root``) and the DreamBooth class data under
        ``data_class``; the original converted them on load, and so does this."""
        data = self.cfg.get("data")
        if not isinstance(data, dict) or not ("batch_size" in data or _target(data.get("bucket"))):
            return
        new: Dict[str, Any] = {}
        for old_key, name in (("data", "dataset1"), ("data_class", "dataset_class")):
            old = self.cfg.get(old_key)
            if not isinstance(old, dict):
                continue
            old = dict(old)
            bucket = dict(old.pop("bucket", None) or {})
            source = {k: old.pop(k) for k in ("img_root", "prompt_template", "caption_file", "att_mask", "tag_transforms",
                                              "word_names", "repeat") if k in old}
            source.setdefault("img_root", bucket.pop("img_root", None))
            new[name] = {**old, "source": {"data_source1": source}, **({"bucket": bucket} if bucket else {})}
        self.cfg["data"] = new
        self.cfg.pop("data_class", None)
        self.note("data", "the early one-dataset layout (keys directly under data, data_class) was read as "
                          f"{', '.join('data.' + n for n in new)}; keys below are named in that layout")

    def _data(self) -> Dict[str, Any]:
        self._old_layout()
        data = self.get("data")
        out: Dict[str, Any] = {}
        if not isinstance(data, dict):
            self.note("data", "no datasets; add [data.NAME] tables")
            return out
        for name, dataset in data.items():
            if isinstance(dataset, dict):
                out[str(name)] = self._dataset(f"data.{name}", dataset)
        return out

    def _dataset(self, key: str, dataset: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        target = _target(dataset)
        self.used.update({f"{key}._target_", f"{key}._partial_"})
        if target is not None and target not in DATASETS:
            self.note(f"{key}._target_", f"{target!r}: hcp reads images and captions with its image_folder source")
        for arg, kind in (("batch_size", int), ("loss_weight", float)):
            value = self.number(f"{key}.{arg}", self.take(f"{key}.{arg}"), kind)
            if value is not None:
                out[arg] = value
        if isinstance(self.get(f"{key}.cache_latents"), bool):
            out["cache_latents"] = self.take(f"{key}.cache_latents")
        if self.get(f"{key}.att_mask_encode") is False:
            self.used.add(f"{key}.att_mask_encode")
        sources = self.get(f"{key}.source")
        if isinstance(sources, list):
            sources = {str(i): s for i, s in enumerate(sources)}
        out["sources"] = []
        backgrounds = set()
        for sname, source in (sources or {}).items():
            if isinstance(source, dict):
                spec, background = self._source(f"{key}.source.{sname}", source)
                out["sources"].append(spec)
                backgrounds.add(background)
        backgrounds.discard(None)
        if backgrounds:
            out["background"] = sorted(backgrounds)[0]
            if len(backgrounds) > 1:
                self.note(f"{key}.source", f"sources use different bg_color; hcp has one background per dataset "
                                           f"({out['background']})")
        bucket = self._bucket(f"{key}.bucket", self.get(f"{key}.bucket"))
        if bucket:
            out["bucket"] = bucket
        return out

    def _source(self, key: str, source: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
        spec: Dict[str, Any] = {"type": "image_folder"}
        target = _target(source)
        self.used.add(f"{key}._target_")
        if target is not None and not str(target).startswith("hcpdiff.data.source.Text2Image"):
            self.note(f"{key}._target_", f"{target!r}: converted as an image folder")
        for arg in ("img_root", "prompt_template", "att_mask"):
            value = self.take(f"{key}.{arg}")
            if value:
                spec[arg] = str(value)
        caption_file = self.take(f"{key}.caption_file")
        if caption_file:
            if str(caption_file).lower().endswith((".json", ".yaml", ".yml")):
                spec["caption_file"] = str(caption_file)
            else:
                self.note(f"{key}.caption_file", f"{caption_file!r} is a folder of .txt captions: hcp reads the .txt "
                                                 "beside each image (elsewhere: `hcp tools convert-captions` makes a .json)")
        repeat = self.number(f"{key}.repeat", self.take(f"{key}.repeat"), int)
        if repeat and repeat != 1:
            spec["repeat"] = repeat
        word_names = dict(self.take(f"{key}.word_names") or {})
        transforms, filled = self._tag_transforms(key, source)
        word_names = {**filled, **word_names} if word_names else filled
        if transforms:
            spec["text_transforms"] = transforms
        if word_names:
            spec["word_names"] = {str(k): self._word(f"{key}.word_names.{k}", v) for k, v in word_names.items()}
        self._image_transforms(f"{key}.image_transforms", source.get("image_transforms"))
        self._check_template(key, spec)
        return spec, self._background(f"{key}.bg_color", self.take(f"{key}.bg_color"))

    def _check_template(self, key: str, spec: Dict[str, Any]) -> None:
        """Fill the {word} placeholders no word_names entry fills with "", as the original's
        TemplateFill did (hcp refuses an unfilled one), reading a template file where it is found."""
        from ..config.values import placeholders

        template = spec.get("prompt_template", "{caption}")
        if template.endswith(".txt"):
            found = next((p for p in self.search_dirs if (p / template).is_file()), None)
            if found is None:
                self.note(f"{key}.prompt_template", f"{template!r} is not found from here; hcp looks for it in the "
                                                    "working folder, then in img_root: run from the folder HCP-Diffusion "
                                                    "ran in, or give its full path")
                return
            template = (found / template).read_text(encoding="utf-8", errors="replace")
        missing = sorted(set(placeholders(template)) - set(spec.get("word_names", {})) - {"caption"})
        if missing:
            spec["word_names"] = {**spec.get("word_names", {}), **{m: "" for m in missing}}
            self.note(f"{key}.word_names", f"the prompt template has {', '.join('{' + m + '}' for m in missing)}, which "
                                           "no word filled: set to \"\" as the original left them; give your word here")

    def _word(self, key: str, value: Any) -> str:
        if isinstance(value, list) and value:  # DreamArtist: [positive, negative]
            self.note(key, f"{_short(value)}: DreamArtist's negative word has no hcp equivalent; the first is used")
            value = value[0]
        return "" if value is None else str(value)

    def _background(self, key: str, colour: Any) -> Optional[str]:
        if colour is None:
            return None
        if isinstance(colour, list) and len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
            return None if colour == [255, 255, 255] else "#{:02x}{:02x}{:02x}".format(*colour)
        self.note(key, f"{_short(colour)} is not an [R, G, B] list; the background stays white")
        return None

    def _tag_transforms(self, key: str, source: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """hcp text transforms and the word_names the TemplateFill entries held."""
        out: List[Dict[str, Any]] = []
        words: Dict[str, Any] = {}
        for name in ("tag_transforms", "text_transforms"):
            block = source.get(name)
            if block is None:
                continue
            self.used.add(f"{key}.{name}")
            items = block.get("transforms", []) if isinstance(block, dict) else block if isinstance(block, list) else []
            if isinstance(block, dict) and _target(block) not in (None, "torchvision.transforms.Compose") and "transforms" not in block:
                items = [block]
            for i, item in enumerate(items or []):
                target = _target(item)
                where = f"{key}.{name}.transforms[{i}]"
                if target == TAG_SHUFFLE:
                    out.append({"type": "tag_shuffle"})
                elif target == TAG_DROPOUT:
                    p = self.number(f"{where}.p", item.get("p", 0.1))
                    out.append({"type": "tag_dropout", **({"p": p} if p is not None else {})})
                elif target == TEMPLATE_FILL:
                    words.update(item.get("word_names") or {})
                else:
                    self.note(where, f"{target or _short(item)!r}: no hcp text transform does this")
        return out, words

    def _image_transforms(self, key: str, block: Any) -> None:
        self.used.add(key)
        if block is None or isinstance(block, str):  # a string left unresolved is already reported
            return
        items = block.get("transforms", []) if isinstance(block, dict) else []
        targets = [_target(t) for t in items]
        if targets == DEFAULT_IMAGE_TRANSFORMS:
            return  # to tensor in [-1, 1]: what hcp does
        extra = [t for t in targets if t not in DEFAULT_IMAGE_TRANSFORMS]
        self.note(key, f"{', '.join(map(str, extra)) or _short(block)}: hcp's images are only scaled to [-1, 1] "
                       "(and cropped by the bucket)")

    def _bucket(self, key: str, bucket: Any) -> Dict[str, Any]:
        self.used.add(key)
        target = str(_target(bucket) or "")
        if not isinstance(bucket, dict) or not target:
            if bucket is not None:
                self.note(key, f"{_short(bucket)}: not a bucket; add bucket = {{ type = \"ratio\", ... }}")
            return {}
        kind = target.rsplit(".", 2)
        cls, method = (kind[-2], kind[-1]) if kind[-1].startswith("from_") else (kind[-1], "")
        args = {k: v for k, v in bucket.items() if k not in ("_target_", "_partial_")}
        out: Dict[str, Any]
        if cls == "FixedBucket":
            size = args.pop("target_size", 512)
            size = [size, size] if not isinstance(size, list) else size
            out = {"type": "fixed", "target_size": [self.number(f"{key}.target_size", s, int) for s in size]}
        elif cls in ("RatioBucket", "SizeBucket", "RatioSizeBucket", "LongEdgeBucket"):
            build_from = "ratios" if method == "from_ratios" else "images"
            out = {"type": "ratio", "from": build_from, "step": ORIGINAL_BUCKET_STEP, "max_ratio": ORIGINAL_MAX_RATIO}
            area = args.pop("target_area", None)
            if cls == "RatioSizeBucket":
                area = args.pop("max_area", area)
            if cls == "LongEdgeBucket" and args.get("target_edge") is not None:
                edge = self.number(f"{key}.target_edge", args.pop("target_edge"), int)
                area = edge * edge if edge else None
            if cls != "RatioBucket":
                self.note(f"{key}._target_", f"{cls} (clusters image sizes, crops or pads without resizing) has no hcp "
                                             "equivalent: converted to ratio buckets near target_area (images are resized); "
                                             "for images of one size use bucket = { type = \"fixed\", target_size = [W, H] }")
            area = self.number(f"{key}.target_area", area, int) if area is not None and area != "---" else None
            if area:
                out["target_area"] = area
            num = self.number(f"{key}.num_bucket", args.pop("num_bucket", None), int)
            if num:
                out["num_buckets"] = num
            step = self.number(f"{key}.step_size", args.pop("step_size", None), int)
            if step:
                out["step"] = step
            ratio = self.number(f"{key}.ratio_max", args.pop("ratio_max", None))
            if ratio:
                out["max_ratio"] = ratio
        else:
            self.note(f"{key}._target_", f"{target!r} is not a bucket hcp knows; add bucket = {{ type = \"ratio\", ... }}")
            return {}
        for arg, value in args.items():
            if value is not None:
                self.note(f"{key}.{arg}", f"{_short(value)}: hcp's {out['type']} bucket has no such option")
        return out

    # ------------------------------------------------------------------ adapters
    def _adapters(self, out: Dict[str, Any], sdxl: bool) -> None:
        for section in ("lora_unet", "lora_text_encoder", "unet", "text_encoder"):
            groups = self.take(section)
            if not groups:
                continue
            if isinstance(groups, dict):
                groups = list(groups.values())
            lora = section.startswith("lora_")
            converted = [self._group(f"{section}[{i}]", g, lora) for i, g in enumerate(groups) if isinstance(g, dict)]
            out[section] = converted
            if sdxl and section.endswith("text_encoder"):
                out[section + "_2"] = [dict(g) for g in converted]
                self.note(section, f"on SDXL the original's {section} covered both text encoders; hcp's [[{section}]] is "
                                   f"the first (CLIP ViT-L), so the groups are repeated as [[{section}_2]] (OpenCLIP bigG)")
        tokenizer = self._tokenizer_pt()
        if tokenizer:
            out["tokenizer_pt"] = tokenizer
        for key in (k for k in self.cfg if str(k).startswith("plugin_")):
            self.used.add(key)
            if self.cfg[key]:
                self.note(key, "HCP-Diffusion model plugins have no hcp equivalent")

    def _group(self, key: str, group: Dict[str, Any], lora: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        layers = group.get("layers")
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None:
            out["layers"] = [str(p) for p in layers]
            odd = [p for p in out["layers"] if ":" in p and not p.startswith("re:")]
            if odd:
                self.note(f"{key}.layers", f"{', '.join(odd)}: the 'cls(...)' and 'pre_hook' prefixes are not hcp "
                                           "syntax (a module name or 're:' + regex); `hcp layers MODEL` lists the names")
        lr = self.number(f"{key}.lr", group.get("lr"))
        if lr is not None:
            out["lr"] = lr
        handled = {"layers", "lr"}
        if lora:
            handled |= self._lora_options(key, group, out)
        for arg, value in group.items():
            if arg not in handled and value is not None:
                self.note(f"{key}.{arg}", f"{_short(value)}: hcp's {'LoRA' if lora else 'fine-tune'} groups have no such option")
        return out

    def _lora_options(self, key: str, group: Dict[str, Any], out: Dict[str, Any]) -> Set[str]:
        rank = self.number(f"{key}.rank", group.get("rank"))
        if rank is not None:
            # A whole number is a rank; a fraction (0.1) is a share of each layer's outputs, in both tools.
            out["rank"] = int(rank) if rank.is_integer() and not isinstance(group.get("rank"), float) else rank
        alpha = group.get("alpha", group.get("scale"))
        if alpha is not None:
            out["alpha"] = self.number(f"{key}.alpha", alpha)
        if group.get("alpha_auto_scale") is False and out.get("alpha") is not None:
            if isinstance(out.get("rank"), int):
                out["alpha"] = out["alpha"] * out["rank"]  # hcp's scale is alpha / rank
            else:
                self.note(f"{key}.alpha_auto_scale", "false with a fractional rank: hcp always scales by alpha / rank")
        if group.get("scale") == 0:
            self.note(f"{key}.scale", "0 (no 1/rank scaling) has no hcp equivalent; set alpha = rank")
        dropout = self.number(f"{key}.dropout", group.get("dropout"))
        if dropout:
            out["dropout"] = dropout
            self.note(f"{key}.dropout", f"{dropout}: the original dropped the LoRA branch's output, hcp drops its input "
                                        "(docs/migration.md)")
        if isinstance(group.get("svd_init"), bool):
            out["svd_init"] = group["svd_init"]
        if group.get("type", "lora") != "lora":
            self.note(f"{key}.type", f"{group['type']!r}: hcp's LoRA groups are plain LoRA")
        return {"rank", "alpha", "scale", "alpha_auto_scale", "dropout", "svd_init", "type"} | \
            ({"bias"} if group.get("bias") is False else set())

    def _tokenizer_pt(self) -> Dict[str, Any]:
        cfg = self.take("tokenizer_pt")
        if not isinstance(cfg, dict):
            return {}
        words = []
        for i, word in enumerate(cfg.get("train") or []):
            if isinstance(word, dict) and word.get("name"):
                entry: Dict[str, Any] = {"name": str(word["name"])}
                lr = self.number(f"tokenizer_pt.train[{i}].lr", word.get("lr"))
                if lr is not None:
                    entry["lr"] = lr
                words.append(entry)
            else:
                self.note(f"tokenizer_pt.train[{i}]", f"{_short(word)}: a trained word is {{ name, lr }}")
        if not words:
            return {}  # the original always loaded emb_dir; hcp needs the table only to train words
        out: Dict[str, Any] = {"train": words}
        if cfg.get("emb_dir"):
            out["emb_dir"] = str(cfg["emb_dir"])
        if isinstance(cfg.get("replace"), bool):
            out["replace"] = cfg["replace"]
        return out

    # ------------------------------------------------------------------ the rest
    def _loggers(self, train: Dict[str, Any]) -> None:
        loggers = self.take("logger") or []
        trackers = []
        for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
            name = str(_target(logger) or "").rsplit(".", 1)[-1]
            step = self.number(f"logger[{i}].log_step", (logger or {}).get("log_step"), int)
            if name == "CLILogger":
                if step:
                    train["log_every"] = step
            elif name in ("TBLogger", "WanDBLogger"):
                trackers.append("tensorboard" if name == "TBLogger" else "wandb")
            else:
                self.note(f"logger[{i}]", f"{name or _short(logger)}: not a logger hcp knows")
        if trackers and "trackers" in self.train_fields():
            train["trackers"] = trackers
        elif "wandb" in trackers:
            self.note("logger", "WanDBLogger: this hcp logs to TensorBoard only")

    def _silent_defaults(self) -> None:
        for key, value in SAME_AS_HCP.items():
            if value is None or self.get(key) == value:
                self.used.add(key)
            elif self.get(key) is not None and key not in self.used:
                self.used.add(key)
                self.note(key, f"{_short(self.get(key))}: {HINTS.get(key, 'no hcp setting')}")

    def _unmapped(self) -> None:
        for path, value in _leaves(self.cfg):
            key = dotted(path)
            if _is_empty(value) or value is False or self._covered(key):
                continue
            self.note(key, f"{_short(value)}: {HINTS.get(key, HINTS.get(str(path[0]), 'no hcp equivalent'))}")

    def _covered(self, key: str) -> bool:
        """Whether ``key`` (or a table above it) was converted, or is a variable other keys referenced."""
        candidates = [key] + [key[:i] for i, ch in enumerate(key) if ch in ".["]
        return any(c in self.used or c in self.references for c in candidates)


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcp tools convert-config",
        description="Turn an HCP-Diffusion training YAML (with its _base_ files) into an hcp pipeline TOML. "
                    "Keys that could not be converted are listed on stderr and at the top of the TOML.")
    parser.add_argument("config", metavar="OLD.yaml", help="the HCP-Diffusion training config")
    parser.add_argument("-o", "--out", default=None, metavar="NEW.toml", help="write here (default: print to stdout)")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="the folder HCP-Diffusion ran in, which _base_ paths are relative to "
                             "(default: found from the file's folder upwards)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``hcp tools convert-config OLD.yaml [-o NEW.toml] [--root DIR] [--force]``."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out and os.path.exists(args.out) and not args.force:
        raise UserError(f"convert-config: {args.out} exists; add --force to overwrite it")
    conversion = convert_file(args.config, root=args.root)
    text = conversion.toml()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}; check it with: hcp check {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if conversion.notes:
        print(f"convert-config: {len(conversion.notes)} key(s) not converted or converted with a difference:", file=sys.stderr)
        for note in conversion.notes:
            print(f"  {note}", file=sys.stderr)
    return 0


__all__ = ["Conversion", "Note", "convert_file", "main"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
