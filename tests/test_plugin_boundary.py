"""The one-way plugin boundary: the core never imports or names the built-in plugins, its
packages import one another in one direction only, and what the core needs from a component
(a LoRA file's merge, a loss's masks, a source's checks) goes through the registry, so an outside
plugin gets exactly what a built-in gets.

Layers of ``hcp_core``, lowest first (a module may import its own layer and lower ones only):

0. core: the top-level modules ``errors``, ``registry``, ``interfaces``, ``hookspecs``,
   ``plugins``, ``adapter_files`` (and any other top-level module but the three below);
1. ``config``;  2. ``data``;  3. ``models``;
4. ``train`` and ``generation``: one layer, but one way: ``train`` may use ``generation``
   (sample images during a run), ``generation`` never imports ``train``;
5. ``tools`` and ``demo``;
6. the front: ``cli``, ``__init__``, ``__main__``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file

import hcp_core
from hcp_core import plugins
from hcp_core.adapter_files import AdapterFileError, find_file_adapter, read_file_header
from hcp_core.config import load_config
from hcp_core.hookspecs import hookimpl
from hcp_core.interfaces import AdapterContext, FileHeader, LossInputs, ModelBundle
from hcp_core.plugins import build_registry
from train_support import pipeline_toml, write_pipeline

CORE = Path(hcp_core.__file__).resolve().parent
PACKAGE_LAYERS = {"config": 1, "data": 2, "models": 3, "train": 4, "generation": 4, "tools": 5, "demo": 5}
FRONT = {"cli", "__init__", "__main__"}


def core_modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("")
        yield ".".join(("hcp_core", *rel.parts)), path


def layer_of(module: str) -> Tuple[int, str]:
    """(layer, group) of a dotted ``hcp_core`` module name."""
    parts = module.split(".")[1:]
    if not parts:
        return 6, "front"
    if parts[0] in PACKAGE_LAYERS and (len(parts) > 1 or (CORE / parts[0]).is_dir()):
        return PACKAGE_LAYERS[parts[0]], parts[0]
    return (6, "front") if parts[0] in FRONT else (0, "core")


def imports_of(module: str, path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, lazy and TYPE_CHECKING ones included."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, target
            for alias in node.names:  # `from .. import x` where x is a module
                yield node.lineno, f"{target}.{alias.name}"


def test_the_core_never_imports_or_names_the_builtin_plugins() -> None:
    offences = []
    for module, path in core_modules():
        for line, target in imports_of(module, path):
            if target.split(".")[0] == "hcp_plugins":
                offences.append(f"{path.relative_to(CORE.parent)}:{line}: imports {target}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "hcp_plugins" in node.value:
                offences.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: names hcp_plugins in a string")
    assert not offences, "\n".join(offences)


def test_core_packages_import_downwards_only() -> None:
    offences = []
    for module, path in core_modules():
        layer, group = layer_of(module)
        for line, target in imports_of(module, path):
            if not target.startswith("hcp_core.") or not _exists(target):
                continue
            other, other_group = layer_of(target)
            if other > layer or (group == "generation" and other_group == "train"):
                offences.append(f"{path.relative_to(CORE.parent)}:{line}: {group} (layer {layer}) imports {target} ({other_group}, layer {other})")
    assert not offences, "\n".join(offences)


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (CORE / rel).with_suffix(".py").is_file() or (CORE / rel).is_dir()


def test_the_layer_scan_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    found = dict((t, n) for n, t in imports_of("hcp_core.generation.generate", CORE / "generation" / "generate.py"))
    assert "hcp_core.adapter_files" in found and "hcp_core.models.family" in found  # both imported lazily
    assert layer_of("hcp_core.generation.generate") == (4, "generation") and layer_of("hcp_core.plugins") == (0, "core")


# --------------------------------------------------------------------------- losses
def test_mse_applies_the_weight_map_itself_and_masked_mse_is_its_alias() -> None:
    registry = build_registry()
    mse = registry.losses.get("mse").build(registry.losses.get("mse").config())
    alias = registry.losses.get("masked_mse").build(registry.losses.get("masked_mse").config())
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    weight = torch.rand(2, 1, 3, 3, generator=gen)
    expected = torch.stack([((pred[b] - target[b]) ** 2 * weight[b]).mean() for b in range(2)])
    for loss in (mse, alias):
        assert torch.allclose(loss(pred, target, LossInputs(timesteps=None, weight_map=weight)), expected)
        plain = loss(pred, target, LossInputs(timesteps=None))
        assert torch.allclose(plain, ((pred - target) ** 2).mean(dim=(1, 2, 3)))


# --------------------------------------------------------------------------- adapter files
def kohya_file(path: Path) -> Path:
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}, str(path), metadata={"ss_x": "1"})  # fmt: skip
    return path


class OffsetFiles:
    """Reads ``*.offset`` tensors: adds ``weight * tensor`` to the named parameter."""

    def reads(self, header: FileHeader) -> bool:
        return header.safetensors and all(k.endswith(".offset") for k in header.keys)

    def apply(self, models: Any, path: str, weight: float) -> int:
        tensors = load_file(path)
        with torch.no_grad():
            for key, value in tensors.items():
                models.unet.get_parameter(key[: -len(".offset")]).add_(weight * value)
        return len(tensors)


@attrs.define
class BiasConfig:
    """Trains the bias of one UNet layer."""

    lr: float = 1e-2
    layer: str = "conv_out"


class BiasAdapter:
    """A whole fine-tuning method in a few lines, from outside the tree."""

    def __init__(self, sections: Mapping[str, List[BiasConfig]], *, context: AdapterContext) -> None:
        (self.config,) = sections["unet"]
        self.bias: Optional[torch.nn.Parameter] = None

    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        self.bias = models.unet.get_submodule(self.config.layer).bias
        self.bias.requires_grad_(True)
        return [{"params": [self.bias], "lr": self.config.lr}]

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {"bias": self.bias.detach().clone()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.bias.copy_(state["bias"])

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        path = str(Path(out_dir) / f"bias{'' if step is None else f'-{step}'}.safetensors")
        save_file({f"{self.config.layer}.bias.offset": self.bias.detach().float().cpu().contiguous()}, path)
        return [path]


class OutsidePlugin:
    """A plugin object passed only through ``extra_plugins``."""

    @staticmethod
    @hookimpl
    def hcp_register_adapters(registry) -> None:
        registry.add("bias", config=BiasConfig, factory="test_plugin_boundary:BiasAdapter",
                     sections={"bias_unet": "unet"}, files="test_plugin_boundary:OffsetFiles")  # fmt: skip


def test_the_file_header_is_read_without_tensors(tmp_path: Path) -> None:
    header = read_file_header(kohya_file(tmp_path / "a.safetensors"))
    assert header.safetensors and header.metadata == {"ss_x": "1"}
    assert sorted(header.keys) == ["lora_unet_conv_in.lora_down.weight", "lora_unet_conv_in.lora_up.weight"]
    (tmp_path / "b.pt").write_bytes(b"not safetensors")
    assert read_file_header(tmp_path / "b.pt") == FileHeader(str(tmp_path / "b.pt"))


def test_the_registry_says_which_adapter_reads_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)
    registry = build_registry(extra_plugins=[OutsidePlugin])
    lora = kohya_file(tmp_path / "a.safetensors")
    assert find_file_adapter(registry, lora).component.name == "lora"
    save_file({"conv_out.bias.offset": torch.ones(4)}, str(tmp_path / "o.safetensors"))
    assert find_file_adapter(registry, tmp_path / "o.safetensors").component.name == "bias"
    save_file({"x": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterFileError) as err:
        find_file_adapter(registry, tmp_path / "x.safetensors")
    assert str(err.value) == (f"--lora {tmp_path / 'x.safetensors'}: no adapter reads this file (its tensor names match no "
                              "adapter's layout). Adapters that read files: bias, lora, lycoris.")
    with pytest.raises(AdapterFileError, match="LoRA file not found"):
        find_file_adapter(registry, tmp_path / "missing.safetensors")


def test_a_blocked_lora_is_named_when_it_is_the_one_that_would_read_the_file(tmp_path: Path, monkeypatch) -> None:
    lora = kohya_file(tmp_path / "a.safetensors")
    for block, message in [
        ("adapters", "adapter 'lora' is provided by plugin 'adapters' (from distribution hcp), which is blocked by HCP_BLOCK_PLUGINS ('adapters')"),
        ("adapters:lora", "adapter 'lora' of plugin 'adapters' (from distribution hcp) is blocked by HCP_BLOCK_PLUGINS ('adapters:lora')"),
    ]:
        monkeypatch.setenv(plugins.BLOCK_ENV, block)
        with pytest.raises(AdapterFileError) as err:
            find_file_adapter(build_registry(), lora, option="--lora")
        assert str(err.value) == f"--lora {lora}: no active adapter reads this file: {message}"


def test_hcp_generate_refuses_a_lora_whose_adapter_is_blocked(tmp_path: Path, monkeypatch, capsys) -> None:
    from hcp_core import cli

    lora = kohya_file(tmp_path / "a.safetensors")
    monkeypatch.setenv(plugins.BLOCK_ENV, "adapters")
    with plugins.using_registry(build_registry()):
        code = cli.main(["generate", "--model", str(tmp_path), "--lora", f"{lora}:0.5", "-p", "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no active adapter reads this file: adapter 'lora' is provided by plugin 'adapters'" in err
    assert not (tmp_path / "out").exists()


def test_an_outside_adapter_trains_and_its_file_merges_back(tmp_path: Path, demo_model_dir, demo_data_dir, monkeypatch) -> None:
    """Registered only through extra_plugins: it trains through hcp_core.run, and hcp generate's
    loader merges its exported file through its file capabilities."""
    from hcp_core.generation.generate import load_for_generation
    from hcp_plugins.models.stable_diffusion.loading import load_models

    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)
    registry = build_registry(extra_plugins=[OutsidePlugin])
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "run", max_steps=2, adapters="[[bias_unet]]\nlr = 0.05\n")
    pipeline = load_config(write_pipeline(tmp_path, text), registry=registry)
    result = hcp_core.run(pipeline)
    (export,) = [p for p in result.exports if p.endswith("bias.safetensors")]
    trained = load_file(export)["conv_out.bias.offset"]
    base = load_models(str(demo_model_dir)).unet.conv_out.bias.detach()
    assert not torch.equal(trained, base)  # it trained
    merged = load_for_generation(str(demo_model_dir), loras=[_spec(export, -1.0)], device="cpu", log_fn=lambda _m: None,
                                 registry=registry)  # fmt: skip
    assert torch.allclose(merged.models.unet.conv_out.bias, base - trained)


def _spec(path: str, weight: float) -> Any:
    from hcp_core.generation.params import LoraSpec

    return LoraSpec(path, weight)
