"""Reading pipelines: ``base = [...]`` inheritance and ``key.sub=value`` overrides (no validation)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from core_components import write
from hcp_core.config.loader import apply_override, deep_merge, load_raw, parse_override_value
from hcp_core.errors import ConfigError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A child config with two bases; the second base has a base of its own, relative to itself."""
    write(tmp_path / "configs/base/train.toml", """\
        seed = 1
        exp_dir = "runs/base"

        [train]
        max_steps = 100
        log_every = 5
        optimizer = { type = "adamw", betas = [0.9, 0.999] }
        """)
    write(tmp_path / "configs/base/tuning.toml", """\
        base = ["common/model.toml"]

        [train]
        max_steps = 200

        [[lora_unet]]
        lr = 1e-4
        layers = ["a", "b"]
        """)
    write(tmp_path / "configs/base/common/model.toml", """\
        [model]
        pretrained = "models/sd15"
        clip_skip = 1

        [data.ds1]
        batch_size = 4
        sources = [{ type = "test_listing", listing = "a.txt" }, { type = "test_listing", listing = "b.txt" }]
        """)
    write(tmp_path / "configs/child.toml", """\
        base = ["base/train.toml", "base/tuning.toml"]
        seed = 1919810

        [model]
        clip_skip = 2

        [data.ds1]
        sources = [{ type = "test_listing", listing = "only.txt" }]
        """)
    return tmp_path / "configs"


def test_bases_merge_tables_replace_lists_and_the_child_wins(tree: Path) -> None:
    raw = load_raw(tree / "child.toml")
    assert raw == {
        "seed": 1919810,  # child over base
        "exp_dir": "runs/base",
        "train": {
            "max_steps": 200,  # the later base wins over the earlier one
            "log_every": 5,  # tables merge key by key
            "optimizer": {"type": "adamw", "betas": [0.9, 0.999]},
        },
        "lora_unet": [{"lr": 1e-4, "layers": ["a", "b"]}],
        "model": {"pretrained": "models/sd15", "clip_skip": 2},  # base of a base, relative to base/
        "data": {"ds1": {"batch_size": 4, "sources": [{"type": "test_listing", "listing": "only.txt"}]}},  # list replaced whole
    }


def test_base_paths_do_not_depend_on_the_working_directory(tree: Path, monkeypatch) -> None:
    monkeypatch.chdir(tree / "base/common")
    assert load_raw(tree / "child.toml")["model"]["pretrained"] == "models/sd15"
    monkeypatch.chdir(tree.parent)
    assert load_raw("configs/child.toml")["seed"] == 1919810


def test_base_may_be_a_single_string_and_is_removed_from_the_result(tmp_path: Path) -> None:
    write(tmp_path / "b.toml", "seed = 3\n")
    write(tmp_path / "a.toml", 'base = "b.toml"\nexp_dir = "x"\n')
    assert load_raw(tmp_path / "a.toml") == {"seed": 3, "exp_dir": "x"}


def test_a_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.toml", "[train]\nmax_steps = 1\n")
    write(tmp_path / "left.toml", 'base = ["root.toml"]\n[train]\nlog_every = 2\n')
    write(tmp_path / "right.toml", 'base = ["root.toml"]\n[train]\nsave_every = 3\n')
    write(tmp_path / "top.toml", 'base = ["left.toml", "right.toml"]\n')
    assert load_raw(tmp_path / "top.toml") == {"train": {"max_steps": 1, "log_every": 2, "save_every": 3}}


def test_a_cycle_of_bases_is_reported_with_the_chain(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'base = ["sub/b.toml"]\n')
    write(tmp_path / "sub/b.toml", 'base = ["../a.toml"]\n')
    a, b = (tmp_path / "a.toml").resolve(), (tmp_path / "sub/b.toml").resolve()
    with pytest.raises(ConfigError) as err:
        load_raw(tmp_path / "a.toml")
    assert str(err.value) == f"config files inherit from each other in a loop: {a} -> {b} -> {a}"


def test_a_file_naming_itself_as_base_is_a_cycle(tmp_path: Path) -> None:
    me = write(tmp_path / "me.toml", 'base = ["me.toml"]\n').resolve()
    with pytest.raises(ConfigError, match="in a loop: "):
        load_raw(me)


def test_a_missing_base_names_the_file_that_refers_to_it(tmp_path: Path) -> None:
    write(tmp_path / "ok.toml", 'base = ["sub/child.toml"]\n')
    child = write(tmp_path / "sub/child.toml", 'base = ["../nope.toml"]\n').resolve()
    with pytest.raises(ConfigError) as err:
        load_raw(tmp_path / "ok.toml")
    assert str(err.value) == f"{child}: base file '../nope.toml' not found (looked for {child.parent / '../nope.toml'})"


def test_a_toml_syntax_error_names_the_file_and_position(tmp_path: Path) -> None:
    write(tmp_path / "top.toml", 'base = ["bad.toml"]\n')
    bad = write(tmp_path / "bad.toml", "seed = 1\nexp_dir = = 2\n").resolve()
    with pytest.raises(ConfigError) as err:
        load_raw(tmp_path / "top.toml")
    assert str(err.value).startswith(f"{bad}: TOML syntax error: ")
    assert "line 2" in str(err.value)


def test_a_missing_config_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere\.toml"):
        load_raw(tmp_path / "nowhere.toml")


@pytest.mark.parametrize("bases", ["[1, 2]", "{ a = 'x.toml' }", "3"])
def test_base_must_be_a_list_of_paths(tmp_path: Path, bases: str) -> None:
    path = write(tmp_path / "a.toml", f"base = {bases}\n").resolve()
    with pytest.raises(ConfigError, match=rf"^{path}: 'base' must be a list of file paths, got "):
        load_raw(path)


def test_deep_merge_copies_and_never_mutates_its_inputs() -> None:
    base = {"t": {"a": 1, "l": [1, 2]}, "x": 1}
    child = {"t": {"b": 2, "l": [3]}, "x": {"now": "a table"}}
    before = copy.deepcopy((base, child))
    merged = deep_merge(base, child)
    assert merged == {"t": {"a": 1, "b": 2, "l": [3]}, "x": {"now": "a table"}}
    assert (base, child) == before
    merged["t"]["l"].append(4)
    assert child["t"]["l"] == [3]


# --------------------------------------------------------------------------- overrides
def test_the_guides_overrides(tree: Path) -> None:
    raw = load_raw(
        tree / "child.toml",
        ["data.ds1.batch_size=2", "seed=1919810", 'model.pretrained="x"', "lora_unet=[]", "train.min_snr_gamma=5"],
    )
    assert raw["data"]["ds1"]["batch_size"] == 2
    assert raw["seed"] == 1919810
    assert raw["model"] == {"pretrained": "x", "clip_skip": 2}
    assert raw["lora_unet"] == []
    assert raw["train"]["min_snr_gamma"] == 5 and raw["train"]["max_steps"] == 200  # a new key; the rest stays


@pytest.mark.parametrize(
    "text, value",
    [
        ("2", 2),
        ("1e-4", 1e-4),
        ("true", True),
        ('"quoted string"', "quoted string"),
        ("'literal'", "literal"),
        ("[1, 2]", [1, 2]),
        ("{ type = 'ratio', num_buckets = 5 }", {"type": "ratio", "num_buckets": 5}),
        ("models/sd15", "models/sd15"),  # not a TOML literal: taken as a plain string
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_override_values_are_toml_literals(text: str, value) -> None:
    assert parse_override_value(text) == value
    data: dict = {}
    apply_override(data, f"k={text}")
    assert data == {"k": value}


def test_override_creates_missing_tables() -> None:
    data = {"model": {"pretrained": "m"}}
    apply_override(data, "data.ds2.bucket.type=fixed")
    assert data == {"model": {"pretrained": "m"}, "data": {"ds2": {"bucket": {"type": "fixed"}}}}


def test_override_replaces_a_whole_table_or_list() -> None:
    data = {"model": {"pretrained": "m", "clip_skip": 1}, "lora_unet": [{"lr": 1}]}
    apply_override(data, "model={ pretrained = 'n' }")
    apply_override(data, "lora_unet=[{ lr = 2 }, { lr = 3 }]")
    assert data == {"model": {"pretrained": "n"}, "lora_unet": [{"lr": 2}, {"lr": 3}]}


def test_override_addresses_list_items_by_index() -> None:
    data = {"data": {"ds1": {"sources": [{"repeat": 1}, {"repeat": 1, "tags": ["a", "b"]}]}}}
    apply_override(data, "data.ds1.sources.1.repeat=10")
    apply_override(data, "data.ds1.sources.1.tags.0=z")
    apply_override(data, "data.ds1.sources.-1.img_root=imgs")  # Python-style negative index
    assert data["data"]["ds1"]["sources"] == [{"repeat": 1}, {"repeat": 10, "tags": ["z", "b"], "img_root": "imgs"}]


def test_overrides_apply_in_order(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", "seed = 1\n")
    assert load_raw(path, ["seed=2", "seed=3"]) == {"seed": 3}


@pytest.mark.parametrize(
    "item, message",
    [
        ("seed.x=1", "override 'seed.x=1': 'seed' is a value (5), not a table"),
        ("seed", "override 'seed' is not KEY=VALUE (for example: data.dataset1.batch_size=2)"),
        ("=1", "override '=1' is not KEY=VALUE (for example: data.dataset1.batch_size=2)"),
    ],
)
def test_bad_overrides_say_what_is_wrong(item: str, message: str) -> None:
    data = {"seed": 5, "data": {"ds1": {"sources": [{}, {}]}}}
    with pytest.raises(ConfigError) as err:
        apply_override(data, item)
    assert str(err.value) == message


@pytest.mark.parametrize("index", ["2", "first"])
def test_a_bad_list_index_gives_the_valid_range(index: str) -> None:
    item = f"data.ds1.sources.{index}.repeat=1"
    with pytest.raises(ConfigError) as err:
        apply_override({"data": {"ds1": {"sources": [{}, {}]}}}, item)
    assert str(err.value).startswith(f"override '{item}': ")
    assert str(err.value).endswith("is a list of 2 items; use an index 0..1")


def test_override_into_an_empty_list_says_it_is_empty() -> None:
    with pytest.raises(ConfigError) as err:
        apply_override({"lora_unet": []}, "lora_unet.0.lr=1")
    assert "0..-1" not in str(err.value)
    assert "empty" in str(err.value)


# --------------------------------------------------------------------------- faulty files
@pytest.mark.parametrize(
    "content, message",
    [
        (b"seed = 1\nexp_dir = \"caf\xe9\"\n", r"not a UTF-8 text file \(byte 23\): save the pipeline as UTF-8 TOML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"not a UTF-8 text file"),
        (b"seed = 1\x00\n", r"TOML syntax error"),
        (b"v = " + b"[" * 5000 + b"]" * 5000, r"values are nested too deeply \(at most 32 levels\)"),
        (b"v = " + b"{a = " * 5000 + b"1" + b"}" * 5000, r"values are nested too deeply"),
        (("[" + ".".join(["a"] * 5000) + "]\nx = 1\n").encode(), r"tables and lists are nested more than 32 levels deep"),
        (b"v = " + b"[" * 40 + b"]" * 40, r"tables and lists are nested more than 32 levels deep"),
    ],
    ids=["latin-1", "binary", "nul-byte", "deep-arrays", "deep-inline-tables", "deep-dotted-tables", "deep-but-parseable"],
)
def test_a_faulty_file_is_one_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "pipe.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_raw(path)
    assert str(path) in str(err.value)


def test_a_deep_base_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "deep.toml", "v = " + "[" * 3000 + "]" * 3000)
    write(tmp_path / "child.toml", 'base = "deep.toml"\n')
    with pytest.raises(ConfigError, match=r"deep\.toml: values are nested too deeply"):
        load_raw(tmp_path / "child.toml")


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a folder, not a config file: give the path of a \.toml file") as err:
        load_raw(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_a_nesting_just_within_the_limit_loads(tmp_path: Path) -> None:
    path = write(tmp_path / "ok.toml", "v = " + "[" * 31 + "1" + "]" * 31)
    value = load_raw(path)["v"]
    for _ in range(31):
        value = value[0]
    assert value == 1


@pytest.mark.parametrize(
    "item, message",
    [
        (".".join(["a"] * 5000) + "=1", r"the key has 5000 parts; at most 32 levels"),
        ("v=" + "[" * 5000 + "]" * 5000, r"nested too deeply \(at most 32 levels\)"),
        ("v=" + "[" * 40 + "]" * 40, r"nested more than 32 levels deep"),
    ],
    ids=["deep-key", "deep-value", "deep-but-parseable-value"],
)
def test_deeply_nested_overrides_are_refused(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_override({}, item)
