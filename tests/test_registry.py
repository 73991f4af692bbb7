"""The typed registry: adding, looking up and lazily building components."""
from __future__ import annotations

import pickle
import random
import sys

import attrs
import pytest

import core_components
from hcp_core import hookspecs
from hcp_core.errors import PluginConflictError, UnknownComponentError, UserError, did_you_mean
from hcp_core.interfaces import AdapterContext, BucketContext, CropPlan, ModelBundle, PromptParts, SourceContext
from hcp_core.plugins import build_registry
from hcp_core.registry import FAMILIES, FAMILY_NOUNS, BucketSpec, ComponentSpec, FamilyRegistry, Registry, TextTransformSpec


@attrs.define
class Cfg:
    """  A config whose docstring becomes the component's doc.  """

    size: int = 1


@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry(extra_plugins=[core_components])


def test_add_records_name_config_factory_and_doc() -> None:
    fam = FamilyRegistry("buckets")
    comp = fam.add("square", config=Cfg, factory="pkg.mod:Square")
    assert (comp.family, comp.name, comp.config, comp.factory) == ("buckets", "square", Cfg, "pkg.mod:Square")
    assert comp.doc == "A config whose docstring becomes the component's doc."
    assert comp.plugin == "<direct>" and comp.distribution is None
    assert fam.add("other", config=Cfg, factory="m:a", doc=" given ").doc == "given"
    assert fam.get("square") is comp


def test_add_rejects_a_config_that_is_not_attrs_and_an_import_path_without_attr() -> None:
    fam = FamilyRegistry("losses")
    with pytest.raises(TypeError, match=r"losses component 'l1': config must be an attrs class"):
        fam.add("l1", config=dict, factory="m:a")
    with pytest.raises(TypeError, match=r"factory must be 'module:attr', got 'pkg.mod.L1'"):
        fam.add("l1", config=Cfg, factory="pkg.mod.L1")
    assert fam.names() == []


def test_unknown_name_lists_what_exists_with_a_did_you_mean() -> None:
    fam = FamilyRegistry("buckets")
    for name in ("square", "ratio", "fixed"):
        fam.add(name, config=Cfg, factory="m:a")
    with pytest.raises(UnknownComponentError) as err:
        fam.get("sqare")
    assert str(err.value) == "unknown bucket 'sqare'. Did you mean 'square'? Known buckets: fixed, ratio, square."
    with pytest.raises(UnknownComponentError) as err:
        fam.get("zzz")
    assert str(err.value) == "unknown bucket 'zzz'. Known buckets: fixed, ratio, square."
    # A user error (exit status 2), deliberately not a KeyError (cattrs would call it "missing").
    assert isinstance(err.value, UserError) and not isinstance(err.value, KeyError)


def test_unknown_name_in_an_empty_family_and_multiword_families() -> None:
    with pytest.raises(UnknownComponentError, match=r"^unknown text transform 'x'\. Known text transforms: none\.$"):
        FamilyRegistry("text_transforms").get("x")
    with pytest.raises(UnknownComponentError, match=r"^unknown data source 'x'\. Known data sources: none\.$"):
        FamilyRegistry("data_sources").get("x")


def test_same_name_twice_in_one_family_names_both_owners() -> None:
    fam = FamilyRegistry("buckets")
    fam._owner = ("first", "dist-one")
    fam.add("square", config=Cfg, factory="m:a")
    fam._owner = ("second", None)
    with pytest.raises(PluginConflictError) as err:
        fam.add("square", config=Cfg, factory="m:b")
    assert str(err.value).startswith(
        "bucket 'square' is registered twice: by plugin 'first' (from distribution dist-one) and by plugin 'second'."
    )
    assert "HCP_BLOCK_PLUGINS" in str(err.value)
    assert fam.get("square").factory == "m:a"  # the first registration stays


def test_family_iteration_is_sorted_and_supports_membership() -> None:
    fam = FamilyRegistry("losses")
    for name in ("mse", "huber", "l1"):
        fam.add(name, config=Cfg, factory="m:a")
    assert [c.name for c in fam] == ["huber", "l1", "mse"] == fam.names()
    assert "l1" in fam and "l2" not in fam


def test_registry_has_one_typed_family_per_hook() -> None:
    reg = Registry()
    assert tuple(reg.families) == FAMILIES
    for family in FAMILIES:
        assert getattr(reg, family) is reg.families[family]
        assert reg.families[family].family == family
        assert family in FAMILY_NOUNS
        assert callable(getattr(hookspecs, f"hcp_register_{family}"))


def test_adapter_sections_map_each_section_to_its_adapter_and_target(registry: Registry) -> None:
    sections = registry.adapter_sections()
    comp = registry.adapters.get("test_layers")
    assert sections["test_unet"] == (comp, "unet")
    assert sections["test_text_encoder"] == (comp, "text_encoder")


def test_two_adapters_claiming_one_section_is_an_error_naming_both() -> None:
    reg = Registry()
    reg.adapters.add("lora", config=Cfg, factory="m:a", sections={"lora_unet": "unet"})
    reg.adapters.add("lokr", config=Cfg, factory="m:b", sections={"lora_unet": "unet"})
    with pytest.raises(PluginConflictError, match=r"section 'lora_unet' is claimed by adapter 'lokr' .* and adapter 'lora'"):
        reg.adapter_sections()


def test_factory_is_imported_only_when_loaded(tmp_path, monkeypatch) -> None:
    core_components.write(tmp_path / "lazy_factory_mod.py", "class Thing:\n    def __init__(self, config, **context):\n        self.args = (config, context)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fam = FamilyRegistry("buckets")
    comp = fam.add("lazy", config=Cfg, factory="lazy_factory_mod:Thing")
    assert "lazy_factory_mod" not in sys.modules
    try:
        built = comp.build(Cfg(size=3), context="ctx")
        assert "lazy_factory_mod" in sys.modules
        assert built.args == (Cfg(size=3), {"context": "ctx"})
    finally:
        sys.modules.pop("lazy_factory_mod", None)


def test_factory_attribute_may_be_dotted() -> None:
    import os.path

    comp = FamilyRegistry("losses").add("join", config=Cfg, factory="os:path.join")
    assert comp.load() is os.path.join


def test_component_spec_builds_with_its_config(registry: Registry) -> None:
    spec = BucketSpec(component=registry.buckets.get("test_square"), config=core_components.SquareConfig(size=32))
    assert isinstance(spec, ComponentSpec) and spec.name == "test_square" and BucketSpec.family == "buckets"
    bucket = spec.build(context=BucketContext(seed=1))
    assert bucket.fit([(100, 50)]) == [(32, 32)]
    # 100x50 scaled so the short side is 32: 64x32, centred crop of 32 columns.
    assert bucket.crop((100, 50), (32, 32), None) == CropPlan(resize=(64, 32), box=(16, 0, 48, 32))
    assert bucket.deterministic


def test_built_components_work_and_pickle(registry: Registry, tmp_path) -> None:
    """The test plugin's source + text transform, built through the registry as the engine would."""
    core_components.write(tmp_path / "images.txt", "a.png 640 480 a red cat\nb.png 64 64\nbroken line\n")
    upper = registry.text_transforms.get("test_upper")
    config = core_components.ListingConfig(
        listing="images.txt", repeat=2, text_transforms=[TextTransformSpec(upper, core_components.UpperConfig())]
    )
    source = registry.data_sources.get("test_listing").build(config, context=SourceContext(registry=registry, base_dir=str(tmp_path)))
    result = pickle.loads(pickle.dumps(source.scan()))
    assert [(r.image, r.size, r.caption, r.repeat) for r in result.records] == [
        (str(tmp_path / "a.png"), (640, 480), "a red cat", 2),
        (str(tmp_path / "b.png"), (64, 64), None, 2),
    ]
    assert [str(p) for p in result.problems] == [f"{tmp_path / 'images.txt'}:3: not 'path width height [caption]' (skipped)"]
    (transform,) = result.records[0].text_transforms
    assert transform(PromptParts("{caption}", "a red cat"), random.Random(0)) == PromptParts("{caption}", "A RED CAT")


def test_adapter_component_trains_the_chosen_layers(registry: Registry, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    unet = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)).requires_grad_(False)
    models = ModelBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    sections = {"unet": [core_components.LayersConfig(lr=0.5, layers=["1."])]}
    adapter = registry.adapters.get("test_layers").build(sections, context=AdapterContext(exp_dir=str(tmp_path)))
    groups = adapter.attach(models)
    assert [g["lr"] for g in groups] == [0.5]
    assert [p is q for p, q in zip(groups[0]["params"], unet[1].parameters())] == [True, True]
    assert [p.requires_grad for p in unet.parameters()] == [False, False, True, True]
    state = adapter.trainable_state()
    assert sorted(state) == ["unet.1.bias", "unet.1.weight"]
    with torch.no_grad():
        unet[1].weight.zero_()
    adapter.load_trainable_state(state)
    assert torch.equal(unet[1].weight, state["unet.1.weight"])
    (path,) = adapter.export(models, str(tmp_path), None)
    assert torch.equal(load_file(path)["unet.1.weight"], state["unet.1.weight"])


def test_did_you_mean() -> None:
    assert did_you_mean("batch_sise", ["batch_size", "bucket"]) == " Did you mean 'batch_size'?"
    assert did_you_mean("xyz", ["batch_size"]) == ""
    assert did_you_mean("a", []) == ""


def test_files_is_an_adapter_only_module_attr_loaded_on_demand(tmp_path, monkeypatch) -> None:
    adapters, losses = FamilyRegistry("adapters"), FamilyRegistry("losses")
    with pytest.raises(TypeError, match="adapters component 'a': files must be 'module:attr', got 'nocolon'"):
        adapters.add("a", config=Cfg, factory="m:f", files="nocolon")
    with pytest.raises(TypeError, match="losses component 'l': sections, options and files are for adapters only"):
        losses.add("l", config=Cfg, factory="m:f", files="m:Files")
    (tmp_path / "hcp_reg_files_mod.py").write_text("class Files:\n    made = 0\n    def __init__(self):\n        Files.made += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    comp = adapters.add("a", config=Cfg, factory="m:f", files="hcp_reg_files_mod:Files")
    assert "hcp_reg_files_mod" not in sys.modules  # registration imports nothing
    assert type(comp.load_files()).__name__ == "Files" and sys.modules["hcp_reg_files_mod"].Files.made == 1
    assert adapters.add("b", config=Cfg, factory="m:f").load_files() is None
    registry = Registry()
    registry.families["adapters"] = adapters
    assert [c.name for c in registry.file_adapters()] == ["a"]


def test_the_builtin_lora_declares_its_file_capabilities(registry: Registry) -> None:
    assert registry.adapters.get("lora").files == "hcp_plugins.adapters.lora.files:LoraFiles"
    assert registry.adapters.get("lycoris").files == "hcp_plugins.adapters.lycoris.files:LycorisFiles"
    assert [c.name for c in registry.file_adapters()] == ["lora", "lycoris"]
