"""LoRA files: kohya and PEFT layouts written, read back with safetensors, matched to models."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hcp_core.errors import UserError
from hcp_plugins.adapters.lora.lora_file import match_layers, read_lora_file, write_lora_file
from hcp_plugins.adapters.lora.naming import canonical_path, kohya_table
from hcp_plugins.adapters.lora.weights import ExportLayer, LoraWeights


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)  # fmt: skip
    return CLIPTextModel(config)


def tiny_unet() -> nn.Module:
    unet = nn.Module()
    unet.conv_in = nn.Conv2d(4, 8, 3, padding=1)
    unet.down_blocks = nn.ModuleList([nn.Module()])
    unet.down_blocks[0].attn1 = nn.Module()
    unet.down_blocks[0].attn1.to_q = nn.Linear(8, 8)
    unet.down_blocks[0].attn1.to_out = nn.ModuleList([nn.Linear(8, 6)])
    return unet


def _weights(host: nn.Module, rank: int, alpha: float, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    w = host.weight
    down_shape = (rank, *w.shape[1:])
    up_shape = (w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ())
    return LoraWeights(torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g), alpha)


@pytest.fixture(scope="module")
def parts():
    return {"unet": tiny_unet(), "text_encoder": tiny_clip()}


def _layers(parts):
    spec = [("unet", "conv_in", 2, 1.0), ("unet", "down_blocks.0.attn1.to_q", 4, 4.0),
            ("unet", "down_blocks.0.attn1.to_out.0", 3, 1.5),
            ("text_encoder", "encoder.layers.0.self_attn.q_proj", 2, 1.0),
            ("text_encoder", "encoder.layers.1.mlp.fc2", 4, 2.0)]  # fmt: skip
    out = []
    for i, (target, name, rank, alpha) in enumerate(spec):
        model = parts[target]
        out.append(ExportLayer(target, canonical_path(target, model, name), _weights(model.get_submodule(name), rank, alpha, i)))
    return out


def test_text_encoder_keys_use_text_model_spelling_whatever_transformers_calls_it(parts):
    te = parts["text_encoder"]
    assert not hasattr(te, "text_model")  # transformers 5 layout here
    table = kohya_table({"text_encoder": te})
    assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert table["lora_te_encoder_layers_0_self_attn_q_proj"] == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    # A transformers-4 style model (text_model level present) gets the very same key.
    wrapped = nn.Module()
    wrapped.text_model = te
    t4 = kohya_table({"text_encoder": wrapped})
    assert t4["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")


def test_kohya_file_round_trip(parts, tmp_path):
    layers = _layers(parts)
    path = write_lora_file(tmp_path / "l.safetensors", layers, fmt="kohya", metadata={"ss_network_dim": "4"})
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
        assert f.get_tensor("lora_unet_down_blocks_0_attn1_to_q.alpha").item() == 4.0
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in keys
    assert "lora_unet_conv_in.lora_down.weight" in keys and len(keys) == 3 * len(layers)
    lora = read_lora_file(path)
    assert lora.layout == "kohya"
    matched = match_layers(lora, parts)
    assert set(matched) == {
        ("unet", "conv_in"), ("unet", "down_blocks.0.attn1.to_q"), ("unet", "down_blocks.0.attn1.to_out.0"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"), ("text_encoder", "encoder.layers.1.mlp.fc2"),
    }  # fmt: skip
    for layer in layers:
        target = layer.target
        name = layer.path.removeprefix("text_model.") if target == "text_encoder" else layer.path
        got = matched[(target, name)]
        assert torch.equal(got.down, layer.weights.down) and torch.equal(got.up, layer.weights.up)
        assert got.alpha == layer.weights.alpha


def test_peft_file_keeps_per_layer_rank_and_alpha(parts, tmp_path):
    layers = _layers(parts)
    path = write_lora_file(tmp_path / "p.safetensors", layers, fmt="peft")
    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())
    assert config["unet.r"] in (2, 3, 4) and "down_blocks.0.attn1.to_q" in config["unet.target_modules"]
    # Text encoder names in the PEFT config are suffixes without text_model. (fit transformers 4 and 5).
    assert "encoder.layers.1.mlp.fc2" in config["text_encoder.target_modules"]
    matched = match_layers(read_lora_file(path), parts)
    assert matched[("unet", "down_blocks.0.attn1.to_out.0")].alpha == 1.5
    assert matched[("unet", "down_blocks.0.attn1.to_q")].alpha == 4.0
    assert matched[("text_encoder", "encoder.layers.1.mlp.fc2")].scale == pytest.approx(0.5)


def test_save_dtype_halves_factors_but_keeps_alpha_exact(parts, tmp_path):
    layers = _layers(parts)
    layers[0].weights.alpha = 1.0 / 3
    path = write_lora_file(tmp_path / "h.safetensors", layers, fmt="kohya", dtype="float16")
    with safe_open(path, framework="pt") as f:
        assert f.get_tensor("lora_unet_conv_in.lora_down.weight").dtype == torch.float16
        assert f.get_tensor("lora_unet_conv_in.alpha").dtype == torch.float32


def test_files_that_do_not_fit_are_errors_by_message(parts, tmp_path):
    good = {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}
    cases = {
        "unknown.safetensors": ({"lora_unet_conv_inn.lora_down.weight": torch.zeros(2, 4, 3, 3),
                                 "lora_unet_conv_inn.lora_up.weight": torch.zeros(8, 2, 1, 1)},
                                r"layer 'lora_unet_conv_inn' is not in this model .* Did you mean 'lora_unet_conv_in'"),
        "shape.safetensors": ({**good, "lora_unet_conv_in.lora_up.weight": torch.zeros(9, 2, 1, 1)},
                              r"has shape \(9, 4, 3, 3\) but the model's layer is \(8, 4, 3, 3\)"),
        "noup.safetensors": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "has no matching"),
        "tucker.safetensors": ({**good, "lora_unet_conv_in.lora_mid.weight": torch.zeros(1)}, "not LoRA or DoRA weights"),
        "model.safetensors": ({"conv_in.weight": torch.zeros(1)}, "no LoRA weights found"),
    }  # fmt: skip
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(UserError, match=message):
            match_layers(read_lora_file(tmp_path / name), parts)
    with pytest.raises(UserError, match="LoRA file not found"):
        read_lora_file(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- broken files
_X = "lora_unet_down_blocks_0_attn1_to_q"
_GOOD = {f"{_X}.lora_down.weight": torch.ones(2, 32), f"{_X}.lora_up.weight": torch.ones(32, 2), f"{_X}.alpha": torch.tensor(2.0)}
_NAN = torch.ones(32, 2)
_NAN[3, 1] = float("nan")
BROKEN = {
    "ranks": ({**_GOOD, f"{_X}.lora_up.weight": torch.ones(32, 7)},
              rf"'{_X}.lora_up.weight' has shape \(32, 7\) but '{_X}.lora_down.weight' has shape \(2, 32\) \(rank 2\)"),
    "rank0": ({**_GOOD, f"{_X}.lora_down.weight": torch.ones(0, 32), f"{_X}.lora_up.weight": torch.ones(32, 0)},
              rf"'{_X}.lora_down.weight' has shape \(0, 32\)"),
    "3d": ({**_GOOD, f"{_X}.lora_down.weight": torch.ones(2, 32, 1)}, rf"'{_X}.lora_down.weight' has shape \(2, 32, 1\)"),
    "vector_alpha": ({**_GOOD, f"{_X}.alpha": torch.ones(3)}, rf"'{_X}.alpha' must be a single number"),
    "int_weights": ({**_GOOD, f"{_X}.lora_down.weight": torch.ones(2, 32, dtype=torch.int64)},
                    rf"'{_X}.lora_down.weight' has dtype int64; LoRA weights must be floating point"),
    "nan": ({**_GOOD, f"{_X}.lora_up.weight": _NAN}, rf"'{_X}.lora_up.weight' holds NaN values"),
    "inf_alpha": ({**_GOOD, f"{_X}.alpha": torch.tensor(float("inf"))}, rf"'{_X}.alpha' holds infinite values"),
}  # fmt: skip


def write_broken(folder, case: str):
    """The file of ``BROKEN[case]`` (or of the file-level cases) in ``folder``; returns (path, message)."""
    path = folder / f"{case}.safetensors"
    if case in BROKEN:
        tensors, message = BROKEN[case]
        save_file(tensors, str(path))
        return path, message
    save_file(_GOOD, str(path))
    data = path.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) - 40])
    elif case == "text":
        path.write_text("this is not a LoRA")
    elif case == "pickle":
        path = folder / "pickle.pt"
        torch.save({"state": object()}, path)
    return path, "not a readable .safetensors file"


@pytest.mark.parametrize("case", [*BROKEN, "truncated", "text", "pickle"])
def test_broken_lora_files_are_one_message_naming_file_and_key(tmp_path, case):
    path, message = write_broken(tmp_path, case)
    with pytest.raises(UserError, match=message) as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


def test_peft_alpha_must_be_finite(tmp_path):
    key = "unet.down_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": torch.ones(2, 32), f"{key}.lora_B.weight": torch.ones(32, 2)}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": float("inf")})})
    with pytest.raises(UserError, match=rf"layer '{key}' has alpha = inf"):
        read_lora_file(tmp_path / "p.safetensors")
    save_file(tensors, str(tmp_path / "q.safetensors"), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(UserError, match="q.safetensors: unreadable LoRA metadata"):
        read_lora_file(tmp_path / "q.safetensors")


def test_an_integer_kohya_alpha_is_accepted(tmp_path):
    save_file({**_GOOD, f"{_X}.alpha": torch.tensor(4)}, str(tmp_path / "a.safetensors"))
    assert read_lora_file(tmp_path / "a.safetensors").weights[_X].alpha == 4.0


@pytest.mark.parametrize("case", ["ranks", "nan", "inf_alpha", "truncated"])
def test_generate_and_merge_lora_refuse_a_broken_file_with_exit_2(tmp_path, demo_model_dir, capsys, case):
    from hcp_core import cli

    path, message = write_broken(tmp_path, case)
    assert cli.main(["generate", "--model", str(demo_model_dir), "--lora", str(path), "-p", "x",
                     "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(message, err) and str(path) in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.png"))
    assert cli.main(["tools", "merge-lora", "--model", str(demo_model_dir), "--lora", str(path), "--out", str(tmp_path / "m")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_python_m_hcp_core_generate_with_a_bad_lora_exits_2_without_traceback(tmp_path, demo_model_dir):
    import subprocess
    import sys

    path, _ = write_broken(tmp_path, "ranks")
    proc = subprocess.run([sys.executable, "-m", "hcp_core", "generate", "--model", str(demo_model_dir), "--lora", str(path),
                           "-p", "x", "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"'{_X}.lora_up.weight' has shape (32, 7)" in proc.stderr
