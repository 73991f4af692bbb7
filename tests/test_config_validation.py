"""Typed validation of merged pipelines: every error names the dotted path and the bad value."""
from __future__ import annotations

import sys
import tomllib
from typing import Any, Dict, List

import pytest

import core_components
import hcp_core
from core_components import MINIMAL_TOML, write
from hcp_core.config import build_pipeline, pipeline_to_dict
from hcp_core.config.convert import toml_keys
from hcp_core.config.loader import apply_override
from hcp_core.config.schema import DatasetConfig
from hcp_core.errors import ConfigError, UserError
from hcp_core.plugins import build_registry
from hcp_core.registry import BucketSpec, Registry, SourceSpec

HEAD = "invalid config:\n  "


@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry(extra_plugins=[core_components])


@pytest.fixture
def raw() -> Dict[str, Any]:
    return tomllib.loads(MINIMAL_TOML)


def problems(raw: Dict[str, Any], registry: Registry, *overrides: str) -> List[str]:
    """The lines of the ConfigError that validating ``raw`` (after ``overrides``) raises."""
    for item in overrides:
        apply_override(raw, item)
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, registry)
    text = str(err.value)
    assert isinstance(err.value, UserError)
    return text[len(HEAD):].split("\n  ") if text.startswith(HEAD) else [text]


def test_a_minimal_pipeline_gets_its_defaults(raw, registry) -> None:
    pipe = build_pipeline(raw, registry, base_dir="/somewhere")
    assert pipe.model.pretrained == "models/tiny"
    assert (pipe.model.clip_skip, pipe.model.mixed_precision, pipe.seed, pipe.exp_dir) == (0, "auto", 0, "runs/exp")
    ds = pipe.data["ds1"]
    assert isinstance(ds.bucket, BucketSpec) and ds.bucket.name == "test_square"
    assert ds.bucket.config == core_components.SquareConfig(size=64, origin="centre")
    (source,) = ds.sources
    assert isinstance(source, SourceSpec) and source.config == core_components.ListingConfig(listing="images.txt")
    assert (ds.batch_size, ds.loss_weight, pipe.sample) == (1, 1.0, None)
    assert pipe.train.loss is None or pipe.train.loss.name == "mse"  # the registered default loss
    assert (pipe.adapters, pipe.base_dir, pipe.raw) == ({}, "/somewhere", raw)


def test_the_guides_overrides_validate(tmp_path, registry, monkeypatch) -> None:
    path = write(tmp_path / "p.toml", MINIMAL_TOML)
    monkeypatch.chdir(tmp_path)
    pipe = hcp_core.load_config(
        path,
        overrides=["data.ds1.batch_size=2", "seed=1919810", 'model.pretrained="x"', "test_unet=[]"],
        registry=registry,
    )
    assert (pipe.data["ds1"].batch_size, pipe.seed, pipe.model.pretrained, pipe.adapters) == (2, 1919810, "x", {"test_unet": []})
    assert pipe.base_dir == str(tmp_path)  # relative paths in a pipeline resolve against the working directory


# --------------------------------------------------------------------------- unknown keys and names
def test_misspelt_key_gets_a_did_you_mean_and_the_allowed_keys(raw, registry) -> None:
    allowed = ", ".join(toml_keys(DatasetConfig))
    assert allowed.startswith("sources, bucket, batch_size, ")
    assert problems(raw, registry, "data.ds1.batch_sise=2") == [
        f"data.ds1.batch_sise: unknown key. Did you mean 'batch_size'? Allowed here: {allowed}."
    ]


def test_misspelt_key_of_a_component_suggests_its_toml_name(raw, registry) -> None:
    # The config field is `origin`, its TOML key `from`: suggestions and the allowed list use `from`.
    assert problems(raw, registry, "data.ds1.bucket.frm=random") == [
        "data.ds1.bucket.frm: unknown key. Did you mean 'from'? Allowed here: size, from."
    ]


def test_renamed_key_is_read_and_written_under_its_toml_name(raw, registry) -> None:
    apply_override(raw, "data.ds1.bucket.from=random")
    pipe = build_pipeline(raw, registry)
    assert pipe.data["ds1"].bucket.config.origin == "random"
    assert pipeline_to_dict(pipe, registry)["data"]["ds1"]["bucket"] == {"type": "test_square", "size": 64, "from": "random"}


def test_override_creating_a_key_the_schema_allows(raw, registry) -> None:
    apply_override(raw, "train.min_snr_gamma=5")
    gamma = build_pipeline(raw, registry).train.min_snr_gamma
    assert gamma == 5.0 and isinstance(gamma, float)


def test_override_creating_a_key_the_schema_does_not_know(raw, registry) -> None:
    (line,) = problems(raw, registry, "train.min_snr_gama=5")
    assert line.startswith("train.min_snr_gama: unknown key. Did you mean 'min_snr_gamma'? Allowed here: max_steps, ")


def test_override_on_a_list_index(raw, registry) -> None:
    apply_override(raw, "data.ds1.sources.0.repeat=3")
    assert build_pipeline(raw, registry).data["ds1"].sources[0].config.repeat == 3
    assert problems(raw, registry, 'data.ds1.sources.0.repeat="many"') == [
        "data.ds1.sources[0].repeat: expected an integer, got 'many' (str)"
    ]


def test_misspelt_section_gets_a_did_you_mean(raw, registry) -> None:
    raw["test_unte"] = [{"lr": 1e-4}]
    (line,) = problems(raw, registry)
    assert line.startswith("test_unte: unknown section. Did you mean 'test_unet'? Known: model, data, seed, exp_dir, train, sample, ")
    assert "test_text_encoder" in line


def test_unknown_component_gets_a_did_you_mean_and_the_list(raw, registry) -> None:
    (line,) = problems(raw, registry, "data.ds1.bucket.type=test_sqare")
    assert line.startswith("data.ds1.bucket: unknown bucket 'test_sqare'. Did you mean 'test_square'? Known buckets: ")
    assert line.endswith(".") and "test_square" in line.split("Known buckets: ")[1]


def test_unknown_component_in_nested_lists(raw, registry) -> None:
    raw["data"]["ds1"]["sources"][0]["text_transforms"] = [{"type": "test_upper"}, {"type": "test_uper"}]
    (line,) = problems(raw, registry)
    assert line.startswith(
        "data.ds1.sources[0].text_transforms[1]: unknown text transform 'test_uper'. Did you mean 'test_upper'? Known text transforms: "
    )


def test_unknown_loss(raw, registry) -> None:
    assert problems(raw, registry, "train.loss={ type = 'msee' }")[0].startswith(
        "train.loss: unknown loss 'msee'. Did you mean 'mse'? Known losses: "
    )
    del raw["train"]
    apply_override(raw, "train.loss={ type = 'mse' }")
    assert build_pipeline(raw, registry).train.loss.name == "mse"


def test_components_are_registered_names_never_import_paths(tmp_path, raw, registry, monkeypatch) -> None:
    write(tmp_path / "hcp_never_imported.py", "class Bucket:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (line,) = problems(raw, registry, "data.ds1.bucket.type=hcp_never_imported:Bucket")
    assert line.startswith("data.ds1.bucket: unknown bucket 'hcp_never_imported:Bucket'. Known buckets: ")
    assert "hcp_never_imported" not in sys.modules


@pytest.mark.parametrize(
    "bucket, message",
    [
        ("{ size = 64 }", "data.ds1.bucket: missing 'type'; choose one of: "),
        ("{ type = 3 }", "data.ds1.bucket: 'type' must be a string, got 3 (int)"),
        ("'test_square'", "data.ds1.bucket: expected a table with a 'type' key, got 'test_square' (str)"),
    ],
)
def test_component_table_without_a_usable_type(raw, registry, bucket: str, message: str) -> None:
    (line,) = problems(raw, registry, f"data.ds1.bucket={bucket}")
    assert line.startswith(message)
    if "choose one of" in message:
        assert "test_square" in line


# --------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "override, message",
    [
        ('seed="abc"', "seed: expected an integer, got 'abc' (str)"),
        ("seed=true", "seed: expected an integer, got True (bool)"),
        ("seed=1.5", "seed: expected an integer, got 1.5 (float)"),
        ("model.gradient_checkpointing=1", "model.gradient_checkpointing: expected true or false, got 1 (int)"),
        ("data.ds1.loss_weight=true", "data.ds1.loss_weight: expected a number, got True (bool)"),
        ("data.ds1.sources.0.listing=3", "data.ds1.sources[0].listing: expected a string, got 3 (int)"),
        ("train.optimizer=3", "train.optimizer: expected a table with a 'type' key, got 3 (int)"),
        ("model=[1]", "model: expected a table, got [1] (list)"),
    ],
)
def test_bad_value_names_path_and_value(raw, registry, override: str, message: str) -> None:
    assert problems(raw, registry, override) == [message]


def test_int_is_accepted_where_a_number_is_expected(raw, registry) -> None:
    apply_override(raw, "data.ds1.loss_weight=2")
    weight = build_pipeline(raw, registry).data["ds1"].loss_weight
    assert weight == 2.0 and isinstance(weight, float)


def test_tuple_of_the_wrong_length(raw, registry) -> None:
    (line,) = problems(raw, registry, "train.optimizer.betas=[0.9]")
    assert line.startswith("train.optimizer.betas: ") and "[0.9]" in line


def test_required_key_missing(raw, registry) -> None:
    del raw["model"]["pretrained"]
    assert problems(raw, registry) == ["model.pretrained: required key missing"]
    assert problems({"model": {"pretrained": "m"}, "data": {"ds1": {"sources": []}}}, registry) == [
        "data.ds1.bucket: required key missing"
    ]


def test_required_sections_missing(registry) -> None:
    assert problems({}, registry) == ["model: required section missing", "data: required section missing"]


def test_no_dataset(raw, registry) -> None:
    raw["data"] = {}
    assert problems(raw, registry) == ["data: define at least one dataset, e.g. [data.dataset1] with sources and a bucket"]


def test_every_problem_is_reported_at_once(raw, registry) -> None:
    lines = problems(raw, registry, 'seed="x"', 'model.clip_skip="y"', "data.ds1.bucket.sise=1", "test_unet={ lr = 'fast' }")
    assert sorted(lines) == [
        "data.ds1.bucket.sise: unknown key. Did you mean 'size'? Allowed here: size, from.",
        "model.clip_skip: expected an integer, got 'y' (str)",
        "seed: expected an integer, got 'x' (str)",
        "test_unet.lr: expected a number, got 'fast' (str)",
    ]


def test_validator_failure_names_the_bad_value(raw, registry) -> None:
    (line,) = problems(raw, registry, 'model.mixed_precision="fp17"')
    assert line.startswith("model")
    assert line.endswith("must be one of 'auto', 'no', 'fp16', 'bf16', got 'fp17'")


@pytest.mark.parametrize(
    "override, path, value",
    [
        ('model.mixed_precision="fp17"', "model.mixed_precision", "'fp17'"),
        ("data.ds1.batch_size=0", "data.ds1.batch_size", "0"),
        ("data.ds1.sources.0.repeat=0", "data.ds1.sources[0].repeat", "0"),
        ("data.ds1.bucket.from='left'", "data.ds1.bucket.from", "'left'"),
        ("test_unet=[{ lr = -1.0 }]", "test_unet[0].lr", "-1.0"),
    ],
    ids=["schema-one-of", "schema-at-least", "attrs-ge", "attrs-in-renamed", "adapter-section"],
)
def test_validator_failure_names_the_field(raw, registry, override: str, path: str, value: str) -> None:
    (line,) = problems(raw, registry, override)
    assert line.startswith(f"{path}: ") and value in line


# --------------------------------------------------------------------------- adapter sections
def test_adapter_section_as_table_or_array_of_tables(raw, registry) -> None:
    LayersConfig = core_components.LayersConfig
    raw["test_unet"] = {"lr": 1e-4, "layers": ["down_blocks.0"]}
    raw["test_text_encoder"] = [{"lr": 1}, {"lr": 2e-5, "layers": ["a"]}]
    pipe = build_pipeline(raw, registry)
    assert pipe.adapters == {
        "test_unet": [LayersConfig(lr=1e-4, layers=["down_blocks.0"])],
        "test_text_encoder": [LayersConfig(lr=1.0), LayersConfig(lr=2e-5, layers=["a"])],
    }
    assert pipeline_to_dict(pipe, registry)["test_text_encoder"] == [{"lr": 1.0, "layers": []}, {"lr": 2e-5, "layers": ["a"]}]


@pytest.mark.parametrize(
    "value, message",
    [
        ("3", "test_unet: expected a table or a list of tables, got 3"),
        ("[1]", "test_unet[0]: expected a table, got 1 (int)"),
        ("[{ lr = 1, layer = ['a'] }]", "test_unet[0].layer: unknown key. Did you mean 'layers'? Allowed here: lr, layers."),
        ("{ layers = ['a'] }", "test_unet.lr: required key missing"),
    ],
)
def test_bad_adapter_section(raw, registry, value: str, message: str) -> None:
    assert problems(raw, registry, f"test_unet={value}") == [message]


# --------------------------------------------------------------------------- known gaps
@pytest.mark.parametrize("override, path", [("sample.prompts='a cat'", "sample.prompts"), ("test_unet={ lr = 1, layers = 'down' }", "test_unet.layers")])
def test_a_string_is_not_a_list(raw, registry, override: str, path: str) -> None:
    (line,) = problems(raw, registry, override)
    assert line.startswith(f"{path}: ") and ("'a cat'" in line or "'down'" in line)


def test_a_value_where_a_table_of_datasets_is_expected(raw, registry) -> None:
    assert problems(raw, registry, "data=3") == ["data: expected a table, got 3 (int)"]


def test_unknown_section_and_bad_values_are_reported_together(raw, registry) -> None:
    raw["tarin"] = {}
    lines = problems(raw, registry, 'seed="x"')
    assert "seed: expected an integer, got 'x' (str)" in lines
    assert any(line.startswith("tarin: unknown section. Did you mean 'train'?") for line in lines)
