"""The TOML writer behind ``hcp config``: whatever it writes, tomllib reads back unchanged."""
from __future__ import annotations

import datetime
import math
import tomllib

import pytest

import core_components
from core_components import normalize
from hcp_core.config import build_pipeline, pipeline_to_dict
from hcp_core.config.toml_write import dumps
from hcp_core.plugins import build_registry


def roundtrip(data):
    return tomllib.loads(dumps(data))


def test_a_pipeline_shaped_document_reads_back_unchanged() -> None:
    data = {
        "seed": 1919810,
        "exp_dir": "runs/my-cat",
        "model": {"pretrained": "models/sd15", "clip_skip": 0, "gradient_checkpointing": True},
        "train": {
            "max_steps": 1000,
            "max_grad_norm": 1.0,
            "optimizer": {"type": "adamw", "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8},
            "loss": {"type": "mse"},
        },
        "data": {
            "dataset1": {
                "batch_size": 4,
                "bucket": {"type": "ratio", "from": "images", "target_area": 262144},
                "sources": [
                    {
                        "type": "image_folder",
                        "prompt_template": "a photo of a {pt1} on the {pt2}, {caption}",
                        "text_transforms": [{"type": "template_fill", "word_names": {"pt1": "my-cat", "pt2": "sofa"}}],
                    },
                    {"type": "image_folder", "text_transforms": []},
                ],
            },
            "reg": {"bucket": {"type": "fixed", "target_size": [512, 512]}, "sources": [{"type": "image_folder"}]},
        },
        "lora_unet": [{"lr": 1e-4, "rank": 2, "layers": ["re:.*\\.attn.?$"]}, {"lr": 5e-5, "rank": 0.1, "layers": []}],
        "tokenizer_pt": {"emb_dir": "embs/", "train": [{"name": "my-cat", "lr": 0.003}]},
    }
    assert roundtrip(data) == data


@pytest.mark.parametrize(
    "value",
    [
        'quote " backslash \\ newline \n tab \t return \r',
        "controls \x00 \x01 \x1f \x08 \x0c",
        "unicode: 猫 é 🐱",
        "",
        "{caption}, 're:.*'",
    ],
    ids=["escapes", "controls", "unicode", "empty", "braces"],
)
def test_strings_read_back_unchanged(value: str) -> None:
    assert roundtrip({"s": value, "t": {"in_table": value}, "l": [value]}) == {"s": value, "t": {"in_table": value}, "l": [value]}


@pytest.mark.parametrize("key", ["bare_key-1", "has space", "dotted.key", "", "猫", 'quote"d', "123"])
def test_keys_are_quoted_when_they_must_be(key: str) -> None:
    data = {key: 1, "table": {key: {key: 2}}, "arr": [{key: 3}]}
    assert roundtrip(data) == data


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, 1e-8, 1e20, 5e-324, 0.1 + 0.2, -7.25])
def test_floats_read_back_exactly(value: float) -> None:
    back = roundtrip({"f": value})["f"]
    assert isinstance(back, float) and back == value and math.copysign(1, back) == math.copysign(1, value)


def test_special_floats_ints_and_bools() -> None:
    back = roundtrip({"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "big": 2**62, "neg": -3, "yes": True, "no": False})
    assert (back["inf"], back["ninf"], back["big"], back["neg"], back["yes"], back["no"]) == (math.inf, -math.inf, 2**62, -3, True, False)
    assert math.isnan(back["nan"])
    assert isinstance(back["yes"], bool) and isinstance(back["big"], int)


def test_none_is_left_out_everywhere() -> None:
    data = {"a": None, "t": {"b": None, "c": 1}, "l": [1, None, 2], "inline": [{"x": None, "y": 1}], "ta": [{"z": None}]}
    assert roundtrip(data) == {"t": {"c": 1}, "l": [1, 2], "inline": [{"y": 1}], "ta": [{}]}


def test_empty_tables_lists_and_documents() -> None:
    data = {"empty_table": {}, "empty_list": [], "nested": {"deeper": {}}, "tables": [{}, {}]}
    assert roundtrip(data) == data
    assert dumps({}) == "\n"


def test_tuples_and_mixed_or_nested_arrays() -> None:
    data = {"size": (512, 768), "mixed": [1, {"a": 1}], "matrix": [[1, 2], [3]], "deep": [[{"a": 1}]]}
    assert roundtrip(data) == normalize(data)


def test_scalars_after_a_subtable_stay_in_their_table() -> None:
    # In dict order the scalar comes after the subtable; TOML needs it written before.
    data = {"t": {"sub": {"x": 1}, "after": 2}, "last": 3}
    assert roundtrip(data) == data


def test_layout_is_readable() -> None:
    text = dumps({"seed": 1, "model": {"pretrained": "m"}, "lora_unet": [{"lr": 0.5}]})
    assert text == 'seed = 1\n\n[model]\npretrained = "m"\n\n[[lora_unet]]\nlr = 0.5\n'


@pytest.mark.parametrize("value", [datetime.date(2024, 1, 1), {1, 2}, object()])
def test_unsupported_values_are_a_clear_error(value) -> None:
    with pytest.raises(TypeError, match="cannot write .* to TOML"):
        dumps({"k": value})


def test_a_resolved_pipeline_round_trips_through_toml() -> None:
    """pipeline -> dict -> TOML -> dict -> pipeline gives the same pipeline."""
    registry = build_registry(extra_plugins=[core_components])
    raw = tomllib.loads(core_components.MINIMAL_TOML)
    raw["data"]["ds1"]["sources"][0]["text_transforms"] = [{"type": "test_upper"}]
    raw["test_unet"] = [{"lr": 1e-4, "layers": ["a", "b"]}]
    raw["train"] = {"loss": {"type": "mse"}, "min_snr_gamma": 5.0}
    raw["sample"] = {"prompts": ["a cat"], "size": [64, 32]}
    first = pipeline_to_dict(build_pipeline(raw, registry), registry)
    text = dumps(first)
    assert tomllib.loads(text) == normalize(first)
    second = pipeline_to_dict(build_pipeline(tomllib.loads(text), registry), registry)
    assert dumps(second) == text


def test_delete_character_is_escaped() -> None:
    assert roundtrip({"s": "a\x7fb"}) == {"s": "a\x7fb"}


def test_keys_outside_the_basic_multilingual_plane() -> None:
    data = {"data": {"🐱": {"batch_size": 1}}}
    assert roundtrip(data) == data
