"""Layer selection by name and ``re:`` pattern, as fine-tune and LoRA groups write it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hcp_core.errors import UserError
from hcp_core.models.layer_select import (
    LayerSelectionError,
    expand_layers,
    own_parameters,
    select_layers,
    select_modules,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(4, 4)
        self.attn.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout(0.0)])
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)


def make_model() -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(), Block()])
    model.head = nn.Linear(4, 2)
    return model


def test_name_selects_the_module_and_layers_inside_it():
    model = make_model()
    picked = select_modules(model, ["blocks.0"], what="g")
    assert list(picked) == ["blocks.0"]
    layers = expand_layers(model, picked, what="g")
    # Norms and dropouts are not layers.
    assert list(layers) == ["blocks.0.attn.to_q", "blocks.0.attn.to_out.0", "blocks.0.conv", "blocks.0.depthwise"]
    assert layers["blocks.0.conv"] is model.blocks[0].conv


def test_regex_uses_re_match_semantics():
    model = make_model()
    # re.match anchors at the start only: 'attn' alone matches nothing, '.*attn' matches.
    with pytest.raises(LayerSelectionError):
        select_modules(model, ["re:attn"], what="g")
    picked = select_modules(model, [r"re:.*\.attn$"], what="g")
    assert list(picked) == ["blocks.0.attn", "blocks.1.attn"]
    layers = select_layers(model, [r"re:.*\.attn$", "head"], what="g")
    assert list(layers) == [
        "blocks.0.attn.to_q", "blocks.0.attn.to_out.0", "blocks.1.attn.to_q", "blocks.1.attn.to_out.0", "head",
    ]  # fmt: skip


def test_unmatched_pattern_names_it_and_near_names():
    model = make_model()
    with pytest.raises(UserError) as info:
        select_modules(model, ["blocks.0.atn"], what="lora_unet[1].layers")
    msg = str(info.value)
    assert "lora_unet[1].layers" in msg and "'blocks.0.atn'" in msg and "'blocks.0.attn'" in msg
    with pytest.raises(UserError, match=r"regular expression 're:.*to_k' .* near ones: .*to_"):
        select_modules(model, ["re:.*to_k"], what="g")
    # A regex is quoted as written (one backslash) and its words are matched against name parts.
    with pytest.raises(UserError) as info:
        select_modules(model, [r"re:.*\.atn$"], what="g")
    assert r"'re:.*\.atn$' matches no module" in str(info.value)
    assert "near ones: 'blocks.0.attn', 'blocks.1.attn'." in str(info.value)


def test_selection_without_layers_is_an_error():
    model = make_model()
    with pytest.raises(UserError, match="hold no Linear or Conv2d"):
        select_layers(model, ["blocks.0.norm"], what="g")


def test_adapter_branches_are_invisible_to_selection():
    model = make_model()

    class Branch(nn.Module):
        hcp_adapter_branch = True

        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Linear(4, 1)

    model.head.add_module("extra", Branch())
    assert "head.extra.down" not in select_layers(model, ["re:.*"], what="g")
    with pytest.raises(UserError):
        select_modules(model, ["head.extra"], what="g")
    params = own_parameters(model.head)
    assert [p.shape for p in params] == [torch.Size([2, 4]), torch.Size([2])]
