"""Small, real components that the core's tests register as a temporary plugin.

Pass this module to ``build_registry(extra_plugins=[core_components])``; the plugin is then called
``core_components``. Names start with ``test_`` so they never collide with the built-ins. It also
holds helpers shared by the core's test modules (pipeline text, fake installed distributions).
"""
from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import attrs
from attrs import validators

from hcp_core.hookspecs import hookimpl
from hcp_core.interfaces import (
    AdapterContext,
    BucketContext,
    CropPlan,
    ImageRecord,
    ModelBundle,
    Problem,
    PromptParts,
    ScanResult,
    Size,
    SourceContext,
)
from hcp_core.registry import FamilyRegistry, TextTransformSpec

PLUGIN_NAME = "core_components"
TESTS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- data source
@attrs.define
class ListingConfig:
    """Images listed in a text file, one ``path width height [caption]`` per line."""

    listing: str
    prompt_template: str = "{caption}"
    repeat: int = attrs.field(default=1, validator=validators.ge(1))
    text_transforms: List[TextTransformSpec] = attrs.field(factory=list)


class ListingSource:
    """A data source that trusts the sizes written in its listing (so it needs no image library)."""

    def __init__(self, config: ListingConfig, *, context: SourceContext) -> None:
        self.config = config
        self.context = context

    def scan(self) -> ScanResult:
        listing = Path(self.context.base_dir) / self.config.listing
        transforms = tuple(spec.build() for spec in self.config.text_transforms)
        records: List[ImageRecord] = []
        problems: List[Problem] = []
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split(maxsplit=3)
            if not fields:
                continue
            if len(fields) < 3 or not (fields[1].isdigit() and fields[2].isdigit()):
                problems.append(Problem(f"{listing}:{number}", "not 'path width height [caption]'", "skipped"))
                continue
            records.append(
                ImageRecord(
                    image=str(listing.parent / fields[0]),
                    size=(int(fields[1]), int(fields[2])),
                    caption=fields[3] if len(fields) == 4 else None,
                    templates=(self.config.prompt_template,),
                    text_transforms=transforms,
                    repeat=self.config.repeat,
                    source="test_listing",
                )
            )
        return ScanResult(records, problems)


# --------------------------------------------------------------------------- bucket
@attrs.define
class SquareConfig:
    """Every image becomes one ``size`` x ``size`` square."""

    size: int = attrs.field(default=64, validator=validators.ge(8))
    #: TOML key ``from`` (a Python keyword): where the square is cut, "centre" or "random".
    origin: str = attrs.field(default="centre", validator=validators.in_(("centre", "random")), metadata={"key": "from"})


class SquareBucket:
    """One square bucket; the image is scaled so its shorter side fits, then cropped."""

    def __init__(self, config: SquareConfig, *, context: BucketContext) -> None:
        self.config = config
        self.deterministic = config.origin == "centre"

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        return [(self.config.size, self.config.size)]

    def assign(self, size: Size, buckets: Sequence[Size]) -> int:
        return 0

    def crop(self, size: Size, bucket: Size, rng: Optional[random.Random]) -> CropPlan:
        side = bucket[0]
        scale = side / min(size)
        w, h = max(side, round(size[0] * scale)), max(side, round(size[1] * scale))
        if self.config.origin == "random" and rng is not None:
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        else:
            left, top = (w - side) // 2, (h - side) // 2
        return CropPlan(resize=(w, h), box=(left, top, left + side, top + side))


# --------------------------------------------------------------------------- text transform
@attrs.define
class UpperConfig:
    """Upper-case the caption."""


class UpperCaption:
    def __init__(self, config: UpperConfig) -> None:
        self.config = config

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        return attrs.evolve(parts, caption=parts.caption.upper())


# --------------------------------------------------------------------------- adapter
@attrs.define
class LayersConfig:
    """Train the parameters whose names start with one of ``layers``, at ``lr``."""

    lr: float = attrs.field(validator=validators.gt(0))
    layers: List[str] = attrs.field(factory=list)


class TrainLayers:
    """A minimal layer fine-tuning adapter (torch is imported only by what it is given)."""

    def __init__(self, sections: Mapping[str, List[LayersConfig]], *, context: AdapterContext) -> None:
        self.sections = dict(sections)
        self.context = context
        self._params: Dict[str, Any] = {}

    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        groups = []
        for target, configs in self.sections.items():
            named = dict(models.part(target).named_parameters())
            for cfg in configs:
                chosen = {n: p for n, p in named.items() if any(n.startswith(prefix) for prefix in cfg.layers)}
                for name, param in chosen.items():
                    param.requires_grad_(True)
                    self._params[f"{target}.{name}"] = param
                groups.append({"params": list(chosen.values()), "lr": cfg.lr})
        return groups

    def trainable_state(self) -> Dict[str, Any]:
        return {name: p.detach().clone() for name, p in self._params.items()}

    def load_trainable_state(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            self._params[name].data.copy_(value)

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        from safetensors.torch import save_file

        path = os.path.join(out_dir, f"layers-{'final' if step is None else step}.safetensors")
        save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, path)
        return [path]


# --------------------------------------------------------------------------- the plugin
@hookimpl
def hcp_register_data_sources(registry: FamilyRegistry) -> None:
    registry.add("test_listing", config=ListingConfig, factory="core_components:ListingSource")


@hookimpl
def hcp_register_buckets(registry: FamilyRegistry) -> None:
    registry.add("test_square", config=SquareConfig, factory="core_components:SquareBucket")


@hookimpl
def hcp_register_text_transforms(registry: FamilyRegistry) -> None:
    registry.add("test_upper", config=UpperConfig, factory="core_components:UpperCaption")


@hookimpl
def hcp_register_adapters(registry: FamilyRegistry) -> None:
    registry.add(
        "test_layers",
        config=LayersConfig,
        factory="core_components:TrainLayers",
        sections={"test_unet": "unet", "test_text_encoder": "text_encoder"},
    )


# --------------------------------------------------------------------------- helpers
#: The smallest valid pipeline using this plugin's components.
MINIMAL_TOML = """\
[model]
pretrained = "models/tiny"

[data.ds1]
bucket = { type = "test_square", size = 64 }

[[data.ds1.sources]]
type = "test_listing"
listing = "images.txt"
"""


def write(path: Path, text: str) -> Path:
    """Write dedented ``text`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def fake_distribution(root: Path, dist: str, entry_points: Mapping[str, str], version: str = "1.0") -> Path:
    """Make ``root`` look like a site-packages holding distribution ``dist`` with ``hcp`` entry
    points (name -> module), as pip would leave it, without building anything."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[hcp]", *(f"{name} = {module}" for name, module in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def subprocess_env(*paths: os.PathLike | str, **extra: str) -> Dict[str, str]:
    """The environment for running ``python -m hcp_core`` with ``paths`` (and the tests folder, so
    this module imports) first on ``PYTHONPATH``; offline, plugins unblocked unless ``extra`` says."""
    env = {k: v for k, v in os.environ.items() if k != "HCP_BLOCK_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def normalize(value: Any) -> Any:
    """Tuples as lists, as TOML gives them back."""
    if isinstance(value, Mapping):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value
