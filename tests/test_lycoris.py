"""LoHa and LoKr ([[lycoris_*]] sections) and DoRA (dora = true) end to end.

The weight formulas are written out here independently of hcp (LyCORIS's published ones); a
tiny run trains LoHa on the UNet, LoKr on the text encoder and DoRA LoRA on the UNet at once, and
its files are checked as users' tools see them: keys and metadata read with safetensors, the
LyCORIS files applied by this module's own formulas, the DoRA file by diffusers' loader.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

import hcp_core
from hcp_core.errors import ConfigError, UserError
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_plugins.adapters.lycoris.adapter import build_lycoris_adapter
from hcp_plugins.adapters.lycoris.algorithms import LycorisBranch, factorization, lycoris_shapes
from hcp_plugins.adapters.lycoris.config import LycorisGroupConfig
from hcp_plugins.adapters.lora.layer import attach_branch
from train_support import assert_same_tensors, pipeline_toml, trained_tensors, write_pipeline

# --------------------------------------------------------------------------- the formulas, written here


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of (p, q) and (r, s[, kh, kw]): block (i, j) is a[i, j] * b."""
    p, q = a.shape[:2]
    r, s = b.shape[:2]
    kernel = tuple(b.shape[2:])
    out = a.reshape(p, 1, q, 1, *[1] * len(kernel)) * b.reshape(1, r, 1, s, *kernel)
    return out.reshape(p * r, q * s, *kernel)


def loha_delta(t: Mapping[str, torch.Tensor], alpha: float, shape) -> torch.Tensor:
    """LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    rank = t["hada_w1_b"].shape[0]
    return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (alpha / rank)).reshape(shape)


def lokr_delta(t: Mapping[str, torch.Tensor], alpha: float, shape) -> torch.Tensor:
    """LoKr: kron(w1, w2) * alpha / rank (scale 1 when neither factor is low-rank)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(t["lokr_w2_a"].shape[0], -1, *shape[2:])
    rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    return kron(w1, w2).reshape(shape) * (alpha / rank if rank else 1.0)


def file_layers(path: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """kohya module name -> {key suffix: tensor} of a safetensors file."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name, _, suffix = key.partition(".")
            out.setdefault(name, {})[suffix] = f.get_tensor(key).float()
    return out


def kohya_names(prefix: str, model: nn.Module, text: bool = False) -> Dict[str, nn.Module]:
    """kohya name -> module: ``<prefix>_<module path with _>`` (text encoders: ``text_model_`` first)."""
    return {f"{prefix}_{'text_model_' if text else ''}{n.replace('.', '_')}": m for n, m in model.named_modules()}


def apply_lycoris_file(path: Path, unet: nn.Module, text_encoder: nn.Module, weight: float = 1.0) -> int:
    """This test's own application of a LyCORIS file: W += weight * dW by the formulas above."""
    modules = {**kohya_names("lora_unet", unet), **kohya_names("lora_te", text_encoder, text=True)}
    with torch.no_grad():
        for name, t in file_layers(path).items():
            host = modules[name]
            delta = (loha_delta if "hada_w1_a" in t else lokr_delta)(t, float(t["alpha"]), host.weight.shape)
            host.weight += weight * delta
    return len(file_layers(path))


# --------------------------------------------------------------------------- formulas vs the branches


def test_factorization_follows_lycoris() -> None:
    cases = {(128, -1): (8, 16), (250, -1): (10, 25), (127, -1): (1, 127), (1024, -1): (32, 32), (128, 4): (4, 32),
             (128, 2): (2, 64), (250, 8): (5, 50), (360, 8): (8, 45), (512, 8): (8, 64), (96, 1000): (8, 12)}  # fmt: skip
    for (dim, factor), expected in cases.items():
        assert factorization(dim, factor) == expected, (dim, factor)


def test_key_prefixes_are_those_webui_and_comfyui_map() -> None:
    from hcp_plugins.adapters.lycoris.naming import lycoris_prefix

    expected = {
        "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
        "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        "flux": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        "sd3": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                "text_encoder_3": "lora_te3"},
    }  # fmt: skip
    for kind, parts in expected.items():
        assert {part: lycoris_prefix(part, kind) for part in parts} == parts, kind


HOSTS = {
    "linear": lambda: nn.Linear(24, 32),
    "conv": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
}
ALGOS = {
    "loha": dict(algo="loha", rank=3),
    "lokr": dict(algo="lokr", rank=2, factor=4),
    "lokr-both": dict(algo="lokr", rank=1, factor=4, decompose_both=True),
    "lokr-full": dict(algo="lokr", rank=8, full_matrix=True),
}


@pytest.mark.parametrize("host_kind", HOSTS)
@pytest.mark.parametrize("algo", ALGOS)
def test_branch_output_is_the_host_with_the_formulas_weight(host_kind: str, algo: str) -> None:
    torch.manual_seed(0)
    host = HOSTS[host_kind]()
    opts = dict(ALGOS[algo])
    name = opts.pop("algo")
    rank = opts.pop("rank")
    shapes = lycoris_shapes(name, host, rank, **opts)
    if algo == "lokr-both":
        assert "lokr_w1_a" in shapes and "lokr_w2_a" in shapes
    if algo == "lokr-full":
        assert "lokr_w1" in shapes and "lokr_w2" in shapes
    branch = LycorisBranch(host, name, shapes, rank, alpha=2.0)
    branch.reset(torch.Generator().manual_seed(1))
    x = torch.randn(2, 24) if host_kind == "linear" else torch.randn(2, 8, 10, 10)
    base = host(x)
    attach_branch(host, branch)
    torch.testing.assert_close(host(x), base)  # a fresh branch changes nothing
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    t = {k: v.detach() for k, v in branch.state_tensors().items()}
    formula = loha_delta if name == "loha" else lokr_delta
    alpha = float(rank) if algo == "lokr-full" else 2.0  # no low-rank factor: scale 1, alpha stored = rank
    assert branch.weights().alpha == alpha
    weight = host.weight + formula(t, alpha, host.weight.shape)
    expected = F.linear(x, weight, host.bias) if host_kind == "linear" else F.conv2d(x, weight, host.bias, 2, 1)
    torch.testing.assert_close(host(x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- one tiny run, three adapters

RUN_ADAPTERS = """
[[lycoris_unet]]
algo = "loha"
lr = 1e-2
rank = 4
alpha = 4.0
layers = ['re:.*\\.attn.?$', 're:.*resnets\\.\\d+\\.conv1$']

[[lycoris_text_encoder]]
algo = "lokr"
lr = 1e-3
rank = 2
alpha = 2.0
factor = 4
decompose_both = true
layers = ['re:.*self_attn\\.(q|v)_proj$']

[[lora_unet]]
lr = 1e-2
rank = 2
dora = true
layers = ['re:.*\\.ff\\.net\\.2$', 're:.*resnets\\.\\d+\\.conv2$']
"""
STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_model_dir, demo_data_dir) -> Dict[str, Path]:
    """One run: LoHa (UNet), LoKr (text encoder), DoRA (UNet; lora.safetensors in the PEFT layout, as
    DoRA with [lora] format left out writes it); checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("lycoris_run")
    exp = tmp / "exp"
    text = pipeline_toml(demo_model_dir, demo_data_dir, exp, adapters=RUN_ADAPTERS, max_steps=STEPS, batch_size=4,
                         save_every=3, bucket='{ type = "fixed", target_size = [64, 64] }',
                         scheduler='{ type = "constant" }')  # fmt: skip
    cfg = write_pipeline(tmp, text)
    hcp_core.run(hcp_core.load_config(cfg))
    return {"tmp": tmp, "exp": exp, "cfg": cfg}


def test_files_hold_lycoris_keys_and_kohya_metadata(run) -> None:
    layers = file_layers(run["exp"] / "lycoris.safetensors")
    q = layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert sorted(q) == ["alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    assert q["hada_w1_a"].shape[1] == 4 and float(q["alpha"]) == 4.0
    conv = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv["hada_w1_b"].dim() == 2  # (rank, in * kh * kw), as LyCORIS writes a non-Tucker conv
    te = layers["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"} <= set(te) or {"lokr_w1_a", "lokr_w1_b"} <= set(te)
    with safe_open(str(run["exp"] / "lycoris.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert '"algo": "loha"' in meta["ss_network_args"]
    assert meta["ss_network_dim"] and meta["ss_steps"] == str(STEPS)
    with safe_open(str(run["exp"] / "lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        mag = f.get_tensor("unet.down_blocks.0.resnets.0.conv2.lora_magnitude_vector")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert mag.shape == (1, mag.numel(), 1, 1)  # PEFT's shape for a convolution
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    assert meta["ss_network_module"] == "lycoris.kohya" and '"dora_wd": "True"' in meta["ss_network_args"]
    with safe_open(str(run["exp"] / "lora.kohya.safetensors"), "pt") as f:  # the layout webui / ComfyUI read
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv2.dora_scale").shape == (mag.numel(), 1, 1, 1)


def _denoise_cases(model_dir: Path, data: Path):
    """(latents, noise, timestep, token ids) for every other training image and 3 fixed draws."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    g = torch.Generator().manual_seed(0)
    cases = []
    with torch.no_grad():
        for p in sorted(q for q in data.iterdir() if q.suffix in (".png", ".jpg"))[::2]:
            im = Image.open(p).convert("RGB").resize((64, 64))
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
            lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            ids = tok(["a picture of " + p.with_suffix(".txt").read_text()], padding="max_length",
                      max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids  # fmt: skip
            for _ in range(3):
                cases.append((lat, torch.randn(lat.shape, generator=g), torch.randint(50, 950, (1,), generator=g), ids))
    return cases


def _denoise_error(cases, scheduler, unet: nn.Module, text_encoder: nn.Module) -> float:
    """Mean epsilon-prediction error of the model on ``cases`` (the training objective)."""
    with torch.no_grad():
        errors = [((unet(scheduler.add_noise(lat, n, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample - n) ** 2
                   ).mean().item() for lat, n, t, ids in cases]  # fmt: skip
    return sum(errors) / len(errors)


def test_trained_files_lower_the_denoising_error(run, demo_model_dir, demo_data_dir) -> None:
    """The LyCORIS file by this module's formulas, the DoRA file by diffusers' load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo_model_dir, safety_checker=None, requires_safety_checker=False)
    cases = _denoise_cases(demo_model_dir, demo_data_dir)
    base = _denoise_error(cases, pipe.scheduler, pipe.unet, pipe.text_encoder)
    assert apply_lycoris_file(run["exp"] / "lycoris.safetensors", pipe.unet, pipe.text_encoder) > 0
    lycoris = _denoise_error(cases, pipe.scheduler, pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(str(run["exp"] / "lora.safetensors"), adapter_name="dora")
    assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())  # loaded as DoRA
    both = _denoise_error(cases, pipe.scheduler, pipe.unet, pipe.text_encoder)
    print("denoise", base, lycoris, both)
    assert lycoris < base and both < lycoris, (base, lycoris, both)


def test_generate_and_merge_lora_apply_the_files(run, demo_model_dir, tmp_path) -> None:
    from hcp_core import cli
    from hcp_core.generation.generate import load_for_generation
    from hcp_core.generation.params import LoraSpec
    from hcp_core.tools.merge_lora import merge_lora

    path = run["exp"] / "lycoris.safetensors"
    expected = load_models(str(demo_model_dir))
    apply_lycoris_file(path, expected.unet, expected.text_encoder, weight=0.5)
    loaded = load_for_generation(str(demo_model_dir), loras=[LoraSpec(str(path), 0.5)], device="cpu",
                                 log_fn=lambda _m: None)  # fmt: skip
    for part in ("unet", "text_encoder"):
        got, want = getattr(loaded.models, part).state_dict(), getattr(expected, part).state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)

    out = merge_lora(demo_model_dir, [(str(path), 0.5)], tmp_path / "merged")
    merged = load_models(str(out))
    name = "down_blocks.0.resnets.0.conv1.weight"
    torch.testing.assert_close(merged.unet.state_dict()[name], expected.unet.state_dict()[name], rtol=1e-5, atol=1e-6)

    assert cli.main(["generate", "--model", str(demo_model_dir), "--out", str(tmp_path / "img"), "--steps", "2",
                     "--size", "64x64", "--lora", f"{path}:0.8", "--lora", str(run["exp"] / "lora.safetensors"),
                     "--prompt", "a picture of a red circle"]) == 0  # fmt: skip
    assert list((tmp_path / "img").glob("*.png"))


def test_resume_is_exact_for_every_algorithm(run) -> None:
    """Copy the run, keep its step-3 checkpoint only, resume: step 6 is bit-identical."""
    exp2 = run["tmp"] / "resumed"
    shutil.copytree(run["exp"], exp2)
    shutil.rmtree(exp2 / "checkpoints" / "step-00000006")
    hcp_core.run(hcp_core.load_config(run["cfg"], [f'exp_dir="{exp2}"']), resume="latest")
    first, resumed = trained_tensors(run["exp"]), trained_tensors(exp2)
    assert any(k.endswith(".hada_w2_a") for k in first) and any(k.endswith(".lokr_w1_b") or k.endswith(".lokr_w1")
                                                                for k in first)  # fmt: skip
    assert any(k.endswith(".dora_scale") for k in first)
    assert_same_tensors(first, resumed)


def test_init_from_continues_the_file(run, demo_model_dir, tmp_path) -> None:
    path = run["exp"] / "lycoris.safetensors"
    bundle = load_models(str(demo_model_dir))
    groups = {"unet": [LycorisGroupConfig(algo="loha", layers=["down_blocks.0.resnets.0.conv1"], rank=8,
                                          init_from=str(path))],
              "text_encoder": [LycorisGroupConfig(algo="lokr", layers=["re:.*self_attn\\.q_proj$"], init_from=str(path))]}
    adapter = build_lycoris_adapter(groups, context=AdapterContext(exp_dir=str(tmp_path)))
    adapter.attach(bundle)
    layers = file_layers(path)
    state = adapter.trainable_state()
    got = state["unet.down_blocks.0.resnets.0.conv1.hada_w1_a"]
    torch.testing.assert_close(got, layers["lora_unet_down_blocks_0_resnets_0_conv1"]["hada_w1_a"])  # rank 4 of the file
    te = state["text_encoder.encoder.layers.1.self_attn.q_proj.lokr_w2_b"]
    torch.testing.assert_close(te, layers["lora_te_text_model_encoder_layers_1_self_attn_q_proj"]["lokr_w2_b"])
    adapter.detach()
    with pytest.raises(UserError, match=r"lycoris_unet\[0\]\.init_from: layer .* is loha in the file but this group "
                                        r"has algo = 'lokr'"):  # fmt: skip
        build_lycoris_adapter({"unet": [LycorisGroupConfig(algo="lokr", layers=["down_blocks.0.resnets.0.conv1"],
                                                           init_from=str(path))]},
                              context=AdapterContext(exp_dir=str(tmp_path))).attach(bundle)


def test_a_layer_carries_one_adapter(demo_model_dir, tmp_path) -> None:
    from hcp_core.models.layer_select import LayerSelectionError
    from hcp_plugins.adapters.lora.adapter import build_lora_adapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    bundle, ctx = load_models(str(demo_model_dir)), AdapterContext(exp_dir=str(tmp_path))
    build_lora_adapter({"unet": [LoraGroupConfig(layers=["conv_in"], dora=True)]}, context=ctx).attach(bundle)
    with pytest.raises(LayerSelectionError, match=r"lycoris_unet\[0\]\.layers: layer 'conv_in' already carries a branch"):
        build_lycoris_adapter({"unet": [LycorisGroupConfig(algo="loha", layers=["conv_in"])]}, context=ctx).attach(bundle)


@pytest.mark.parametrize("table, message", [
    ('algo = "lohaa"', r"lycoris_unet\[0\]\.algo: must be one of 'loha', 'lokr', got 'lohaa'"),
    ('algo = "lokr"\nfactor = 0', r"lycoris_unet\[0\]\.factor: must be -1 .* or an integer between 1 and"),
    ('algo = "loha"\nfactor = 4', r"lycoris_unet\[0\]\.factor: is a LoKr option"),
    ('algo = "loha"\ndecompose_both = true', r"lycoris_unet\[0\]\.decompose_both: is a LoKr option"),
    ('algo = "loha"\nrank = 0.5', r"lycoris_unet\[0\]\.rank: expected an integer, got 0.5"),
    ('layers = ["conv_in"]', r"lycoris_unet\[0\]\.algo"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path, demo_model_dir, demo_data_dir, table, message) -> None:
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "e", adapters=f"[[lycoris_unet]]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        hcp_core.load_config(write_pipeline(tmp_path, text))


def test_dora_with_svd_init_is_refused(tmp_path, demo_model_dir, demo_data_dir) -> None:
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "e",
                         adapters="[[lora_unet]]\nlayers = ['conv_in']\nsvd_init = true\ndora = true\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"lora_unet\[0\]\.dora: dora = true cannot be combined with svd_init"):
        hcp_core.load_config(write_pipeline(tmp_path, text))


def flux_parts(model_dir: Path) -> ModelBundle:
    """The demo FLUX transformer and T5 encoder in a ModelBundle."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    return ModelBundle(unet=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None, kind="flux",
                       transformer=FluxTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer"),
                       text_encoder_2=T5EncoderModel.from_pretrained(str(model_dir / "text_encoder_2")))  # fmt: skip


def test_flux_files_use_the_names_comfyui_maps(flux_model_dir, tmp_path) -> None:
    """FLUX: ``lora_transformer_<diffusers path>`` and ``lora_te2_`` (T5), merged = trained."""
    from hcp_plugins.adapters.lycoris.files import LycorisFiles

    bundle = flux_parts(flux_model_dir)
    groups = {"transformer": [LycorisGroupConfig(algo="lokr", layers=["re:transformer_blocks\\.0\\.attn\\.to_q$"], rank=2)],
              "text_encoder_2": [LycorisGroupConfig(algo="loha", layers=["re:.*block\\.0\\..*SelfAttention\\.q$"])]}
    adapter = build_lycoris_adapter(groups, context=AdapterContext(exp_dir=str(tmp_path)))
    adapter.attach(bundle)
    with torch.no_grad():
        for p in adapter.trainable_state().values():
            p.add_(0.1)
    [path] = adapter.export(bundle, str(tmp_path), None)
    keys = set(file_layers(Path(path)))
    assert keys == {"lora_transformer_transformer_blocks_0_attn_to_q", "lora_te2_encoder_block_0_layer_0_SelfAttention_q"}
    host = bundle.transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(3, host.in_features)
    trained = host(x)
    fresh = flux_parts(flux_model_dir)
    assert LycorisFiles().apply(fresh, path, 1.0) == 2
    torch.testing.assert_close(fresh.transformer.transformer_blocks[0].attn.to_q(x), trained, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(trained.detach().sum()))
