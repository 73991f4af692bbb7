"""Prompt templates and text transforms: template_fill, tag_shuffle, tag_dropout, template files."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from PIL import Image

from hcp_core.config.convert import make_converter, structure
from hcp_core.config.schema import DatasetConfig
from hcp_core.data.prepare import prepare_dataset
from hcp_core.data.prompts import TemplateFill, build_prompt, render
from hcp_core.errors import ConfigError
from hcp_core.interfaces import ImageRecord, PromptParts, SourceContext
from hcp_core.plugins import build_registry

REGISTRY = build_registry()


def dataset_config(**table) -> DatasetConfig:
    conv = make_converter(REGISTRY)
    return structure(conv, {"sources": [{"type": "image_folder", **table}], "bucket": {"type": "fixed"}}, DatasetConfig)


def build_source(tmp_path, **table):
    cfg = dataset_config(**table)
    return cfg.sources[0].build(context=SourceContext(registry=REGISTRY, base_dir=str(tmp_path), dataset="ds"))


def transform(table):
    conv = make_converter(REGISTRY)
    cfg = structure(conv, {"sources": [{"type": "image_folder", "img_root": ".", "text_transforms": [table]}],
                           "bucket": {"type": "fixed"}}, DatasetConfig)
    return cfg.sources[0].config.text_transforms[0].build()


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red, green, blue, cyan, pink")
    return tmp_path


def test_template_fill_then_caption():
    fill = transform({"type": "template_fill", "word_names": {"pt1": "my-cat", "pt2": "sofa"}})
    parts = fill(PromptParts("a photo of a {pt1} on the {pt2}, {caption}", "cute {pt1}"), random.Random(0))
    assert parts.template == "a photo of a my-cat on the sofa, {caption}"
    # The caption is inserted last and its own braces are not placeholders.
    assert render(parts) == "a photo of a my-cat on the sofa, cute {pt1}"
    assert render(PromptParts("a photo of a my-cat, {caption}", "")) == "a photo of a my-cat"


def test_tag_shuffle_is_a_permutation_that_keeps_the_first_tags():
    shuffle = transform({"type": "tag_shuffle", "keep_first": 1})
    seen = set()
    for seed in range(30):
        out = shuffle(PromptParts("{caption}", "1girl, red,green , blue,, cyan"), random.Random(seed)).caption
        tags = out.split(", ")
        assert tags[0] == "1girl" and sorted(tags[1:]) == ["blue", "cyan", "green", "red"]
        seen.add(out)
    assert len(seen) > 5
    same = [shuffle(PromptParts("{caption}", "a, b, c, d"), random.Random(7)).caption for _ in range(2)]
    assert same[0] == same[1]


def test_tag_dropout_rate_and_keep_first():
    drop = transform({"type": "tag_dropout", "p": 0.3, "keep_first": 2})
    tags = [f"t{i}" for i in range(10)]
    kept = Counter()
    for seed in range(400):
        out = drop(PromptParts("{caption}", ", ".join(tags)), random.Random(seed)).caption.split(", ")
        assert out[:2] == ["t0", "t1"] and out == [t for t in tags if t in out]  # order kept
        kept.update(out[2:])
    rate = sum(kept.values()) / (400 * 8)
    assert abs(rate - 0.7) < 0.04
    assert transform({"type": "tag_dropout", "p": 0.0})(PromptParts("", "a, b"), random.Random(0)).caption == "a, b"
    assert transform({"type": "tag_dropout", "p": 1.0})(PromptParts("", "a, b"), random.Random(0)).caption == ""


def test_tag_dropout_probability_is_validated():
    with pytest.raises(ConfigError, match="must be between 0 and 1, got 1.5"):
        transform({"type": "tag_dropout", "p": 1.5})


def test_random_template_per_sample_from_a_file(folder):
    (folder / "templates.txt").write_text("a photo of {pt1}, {caption}\n\nart of {pt1}\n  a {pt2} with {pt1}  \n")
    source = build_source(folder, img_root=".", prompt_template="templates.txt", word_names={"pt1": "sks", "pt2": "dog"})
    [record] = source.scan().records
    assert record.templates == ("a photo of {pt1}, {caption}", "art of {pt1}", "a {pt2} with {pt1}")
    prompts = Counter(build_prompt(record, random.Random(s)) for s in range(300))
    assert set(prompts) == {"a photo of sks, red, green, blue, cyan, pink", "art of sks", "a dog with sks"}
    assert min(prompts.values()) > 60  # roughly uniform


def test_transforms_run_in_order_and_source_words_fill_the_rest(folder):
    source = build_source(
        folder,
        img_root=".",
        prompt_template="{pt1} {pt2}, {caption}",
        word_names={"pt1": "from-source", "pt2": "sofa"},
        text_transforms=[{"type": "template_fill", "word_names": {"pt1": "my-cat"}}, {"type": "tag_dropout", "p": 1.0}],
    )
    [record] = source.scan().records
    # The listed template_fill wins for pt1; the source's word_names fill pt2; the caption is dropped.
    assert build_prompt(record, random.Random(0)) == "my-cat sofa"


def test_unfilled_placeholder_is_a_config_error(folder):
    cfg = dataset_config(img_root=".", prompt_template="a {pt1} on {pt9}, {caption}", word_names={"pt1": "x"})
    with pytest.raises(ConfigError, match=r"data\.ds\.sources\[0\] \(image_folder\): prompt template 'a \{pt1\} on \{pt9\}, \{caption\}' has \{pt9\} but no word_names entry fills it"):
        prepare_dataset("ds", cfg, registry=REGISTRY, base_dir=str(folder))


def test_missing_template_file_is_named(folder):
    with pytest.raises(Exception, match=r"prompt_template file 'nope.txt' not found"):
        build_source(folder, img_root=".", prompt_template="nope.txt")


def test_template_fill_values_may_be_embedding_names():
    record = ImageRecord(image="x.png", size=(8, 8), caption=None, templates=("{pt1}, {caption}",),
                         text_transforms=(TemplateFill({"pt1": "my-emb"}),))
    # An embedding name is put in as a word; the prompt-tuning adapter expands it to its tokens.
    assert build_prompt(record, random.Random(0)) == "my-emb"
