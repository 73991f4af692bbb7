"""``hcp tools create-embedding``: random, text and mixed starts, fitting to N, refusals."""
from __future__ import annotations

import pytest
import torch

from hcp_core import cli
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.tools.create_embedding import RandomRows, parse_init_text



@pytest.fixture
def hcp_tools():
    """``hcp tools create-embedding ...`` through the real CLI entry point."""
    return lambda *args: cli.main(["tools", "create-embedding", *map(str, args)])


@pytest.fixture(scope="module")
def token_table(demo_model_dir):
    bundle = load_models(demo_model_dir)
    return bundle.tokenizer, bundle.text_encoder.get_input_embeddings().weight.detach()


def a1111_vectors(path) -> torch.Tensor:
    data = torch.load(path, weights_only=True)
    return data["string_to_param"]["*"]


def test_init_text_parts() -> None:
    assert parse_init_text("cat, *[0.01, 2], red cat") == ["cat", RandomRows(0.01, 2), "red cat"]
    assert parse_init_text(" *[ 1e-2 ,3 ] ") == [RandomRows(0.01, 3)]


def test_random_rows_have_the_asked_shape_and_spread(tmp_path, demo_model_dir, hcp_tools) -> None:
    assert hcp_tools(demo_model_dir, "my-word", 75, "--init-text", "*[0.5, 75]", "--out", tmp_path, "--seed", 3) == 0
    vectors = a1111_vectors(tmp_path / "my-word.pt")
    assert vectors.shape == (75, 32)  # the demo text encoder's width
    assert abs(float(vectors.mean())) < 0.03
    assert float(vectors.std()) == pytest.approx(0.5, rel=0.05)


def test_words_and_random_rows_mix_then_fit_to_n(tmp_path, demo_model_dir, hcp_tools, token_table) -> None:
    tokenizer, table = token_table
    cat, sofa = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("cat", "sofa"))
    assert hcp_tools(demo_model_dir, "mix", 4, "--init-text", "cat, *[0.01, 2], sofa", "--out", tmp_path, "--seed", 0) == 0
    mix = a1111_vectors(tmp_path / "mix.pt")
    assert torch.equal(mix[0], table[cat]) and torch.equal(mix[3], table[sofa])
    assert float(mix[1:3].std()) < 0.02 and not torch.equal(mix[1], mix[2])

    assert hcp_tools(demo_model_dir, "cut", 2, "--init-text", "cat, *[0.01, 2], sofa", "--out", tmp_path, "--seed", 0) == 0
    cut = a1111_vectors(tmp_path / "cut.pt")
    assert cut.shape == (2, 32) and torch.equal(cut, mix[:2])  # the end is dropped

    assert hcp_tools(demo_model_dir, "pad", 8, "--init-text", "cat, sofa", "--out", tmp_path, "--seed", 0,
                     "--format", "safetensors") == 0  # fmt: skip
    from safetensors.torch import load_file

    pad = load_file(str(tmp_path / "pad.safetensors"))["pad"]
    assert torch.equal(pad[0], table[cat]) and torch.equal(pad[1], table[sofa])
    assert float(pad[2:].std()) == pytest.approx(float(table.std()), rel=0.25)  # padded like ordinary tokens


def test_refusals_are_clear(tmp_path, demo_model_dir, hcp_tools, capsys) -> None:
    assert hcp_tools(demo_model_dir, "cat", 2, "--out", tmp_path) == 2
    assert "NAME 'cat' is already one token" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

    assert hcp_tools(demo_model_dir, "my-cat", 2, "--out", tmp_path, "--seed", 1) == 0
    first = a1111_vectors(tmp_path / "my-cat.pt")
    assert hcp_tools(demo_model_dir, "My-Cat", 2, "--out", tmp_path, "--format", "safetensors") == 2
    err = capsys.readouterr().err
    assert "custom word 'My-Cat' already exists" in err and "my-cat.pt; add --force" in err
    assert torch.equal(a1111_vectors(tmp_path / "my-cat.pt"), first)
    assert hcp_tools(demo_model_dir, "my-cat", 3, "--out", tmp_path, "--seed", 2, "--force") == 0
    assert a1111_vectors(tmp_path / "my-cat.pt").shape == (3, 32)

    assert hcp_tools(demo_model_dir, "w", 2, "--init-text", "*[x, 2]", "--out", tmp_path) == 2
    assert "std must be a number" in capsys.readouterr().err
    assert hcp_tools(demo_model_dir, "long-word", 76, "--out", tmp_path) == 2
    assert "at most 75 vectors fit" in capsys.readouterr().err
