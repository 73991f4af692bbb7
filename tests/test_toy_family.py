"""A model family written outside hcp: registered only through ``extra_plugins``, detected from
its folder's ``model_index.json``, and trained with a LoRA by ``hcp_core.run``, resumably.

The toy family ``toy_dit`` is a tiny class-conditional diffusion transformer (diffusers'
``DiTTransformer2DModel``, class label 0 for every prompt) with the SD demo's VAE and a DDPM
epsilon objective written here. Nothing in ``hcp_core`` or the built-ins knows it, so this is
what a third-party architecture plugin gets (CONTRIBUTING.md, "Model families").
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Mapping, Optional, Sequence

import attrs
import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core import plugins
from hcp_core.config import load_config
from hcp_core.errors import ConfigError
from hcp_core.hookspecs import hookimpl
from hcp_core.interfaces import ModelBundle, TrainingPrediction
from hcp_core.plugins import build_registry
from hcp_core.train.diffusion import sample_seed
from train_support import assert_same_tensors, pipeline_toml, write_pipeline

PIPELINE_CLASS = "ToyDiTPipeline"  # a made-up diffusers pipeline class: only the toy family reads it
SIDE = 64  # bucket side in pixels: a multiple of 16 (VAE factor 8 x DiT patch 2); DiT is square-only


# --------------------------------------------------------------------------- the plugin
@attrs.define
class ToyDiTConfig:
    """A tiny class-conditional DiT (every prompt is class ``class_label``), DDPM epsilon objective."""

    class_label: int = attrs.field(default=0, validator=attrs.validators.ge(0))


class ToyPlugin:
    """A plugin object passed only through ``extra_plugins``."""

    @staticmethod
    @hookimpl
    def hcp_register_models(registry) -> None:
        registry.add("toy_dit", config=ToyDiTConfig, factory="test_toy_family:ToyDiTFamily", detect=(PIPELINE_CLASS,))


class ClassLabels:
    """The toy's prompt encoder: prompts in, one class label per prompt out (picklable)."""

    def __init__(self, label: int) -> None:
        self.label = label

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.full((len(prompts),), self.label, dtype=torch.long)


class ToyDiTFamily:
    """``factory(config) -> ModelFamily`` for ``toy_dit``."""

    parts = ("transformer",)

    def __init__(self, config: ToyDiTConfig) -> None:
        self.config = config

    def load(self, pretrained: str, *, config: Optional[str] = None, prediction_type: Optional[str] = None) -> ModelBundle:
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        root = Path(pretrained)
        bundle = ModelBundle(
            unet=None, transformer=DiTTransformer2DModel.from_pretrained(root / "transformer"),
            vae=AutoencoderKL.from_pretrained(root / "vae"), text_encoder=None, tokenizer=None,
            scheduler=DDPMScheduler.from_pretrained(root / "scheduler"), kind="toy_dit", source=str(root),
            prediction_type=prediction_type or "epsilon",
        )  # fmt: skip
        for module in bundle.modules().values():
            module.requires_grad_(False).eval().float()
        return bundle

    def load_skeleton(self, pretrained: str, *, config: Optional[str] = None,
                      prediction_type: Optional[str] = None) -> Optional[ModelBundle]:
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        root = Path(pretrained)
        with init_empty_weights():
            transformer = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(root / "transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        return ModelBundle(unet=None, transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                           scheduler=DDPMScheduler.from_pretrained(root / "scheduler"), kind="toy_dit", source=str(root))

    def latent_factor(self, models: ModelBundle) -> int:
        return 2 ** (len(models.vae.config.block_out_channels) - 1)

    def size_multiple(self, models: ModelBundle) -> int:
        """Latents are cut into ``patch_size`` patches, so bucket sides are multiples of both."""
        return self.latent_factor(models) * models.transformer.config.patch_size

    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> Any:
        return ClassLabels(self.config.class_label)

    def training_prediction(self, models: ModelBundle, encoder: Any, batch: Mapping[str, Any], latents: torch.Tensor,
                            sample_ids: List[int], *, seed: int, step: int, train: Any,
                            autocast: Callable[[], ContextManager], train_text: bool) -> TrainingPrediction:
        scheduler = models.scheduler
        noises, steps = [], []
        for sid in sample_ids:  # keyed per sample: the same draws whatever the batching, and on resume
            g = torch.Generator().manual_seed(sample_seed(seed, step, int(sid)))
            noises.append(torch.randn(latents.shape[1:], generator=g))
            steps.append(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g))
        noise = torch.stack(noises).to(latents)
        t = torch.cat(steps).to(latents.device)
        labels = encoder(batch["prompts"]).to(latents.device)
        with autocast():
            pred = models.transformer(scheduler.add_noise(latents, noise, t), timestep=t, class_labels=labels).sample
        return TrainingPrediction(pred=pred, target=noise, timesteps=t)

    def render(self, models: ModelBundle, encoder: Any, params: Any, *, autocast: Callable[[], ContextManager]) -> Any:
        from diffusers import DDIMScheduler
        from PIL import Image

        scheduler = DDIMScheduler.from_config(models.scheduler.config)
        scheduler.set_timesteps(params.steps)
        factor, device = self.latent_factor(models), models.vae.device
        g = torch.Generator().manual_seed(params.seed)
        x = torch.randn((1, models.transformer.config.in_channels, params.height // factor, params.width // factor),
                        generator=g).to(device)
        labels = encoder([params.prompt]).to(device)
        with torch.no_grad(), autocast():
            for t in scheduler.timesteps:
                eps = models.transformer(x, timestep=t.reshape(1).to(device), class_labels=labels).sample
                x = scheduler.step(eps.float(), t, x).prev_sample
            pixels = models.vae.decode(x / models.vae.config.scaling_factor).sample
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """A diffusers-style folder of the toy: transformer/, the demo's vae/, scheduler/, model_index.json."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("toy_dit")
    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=SIDE // 8, patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(root / "transformer")  # fmt: skip
    shutil.copytree(demo_model_dir / "vae", root / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": PIPELINE_CLASS, "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }))  # fmt: skip
    return root


@pytest.fixture(autouse=True)
def _no_blocked_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)


LORA = """
[[lora_transformer]]
lr = 1e-2
rank = 2
alpha = 2.0
layers = ['re:.*\\.attn1$']
"""


def toy_toml(model: Path, data: Path, exp_dir: Path, *, max_steps: int, save_every: int = 0, extra: str = "") -> str:
    """A LoRA pipeline on the toy: no model.family (it is detected), square buckets, constant lr."""
    return pipeline_toml(model, data, exp_dir, adapters=LORA, extra=extra, max_steps=max_steps, save_every=save_every,
                         bucket=f'{{ type = "fixed", target_size = [{SIDE}, {SIDE}] }}', scheduler='{ type = "constant" }')


def toy_pipeline(tmp: Path, name: str, text: str) -> Any:
    return load_config(write_pipeline(tmp, text, f"{name}.toml"), registry=build_registry(extra_plugins=[ToyPlugin]))


def checkpoint(exp_dir: Path, step: int) -> dict:
    """The trained tensors of ``exp_dir``'s checkpoint of ``step``."""
    (folder,) = [p for p in (exp_dir / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) == step]
    return load_file(str(folder / "trainable.safetensors"))


# --------------------------------------------------------------------------- tests
def test_the_toy_family_is_detected_from_its_folder(tmp_path: Path, toy_model_dir: Path, demo_data_dir: Path) -> None:
    registry = build_registry(extra_plugins=[ToyPlugin])
    comp = registry.models.get("toy_dit")
    assert (comp.plugin, comp.detect) == ("ToyPlugin", (PIPELINE_CLASS,))
    assert registry.family_for(PIPELINE_CLASS) is comp
    pipeline = toy_pipeline(tmp_path, "pipe", toy_toml(toy_model_dir, demo_data_dir, tmp_path / "run", max_steps=1))
    assert pipeline.model.family.name == "toy_dit" and pipeline.model.family.config == ToyDiTConfig()
    # Without the plugin, nothing reads the folder: the user is told to set model.family or install it.
    with pytest.raises(ConfigError, match=f"no installed model family reads {PIPELINE_CLASS} folders"):
        load_config(tmp_path / "pipe.toml", registry=build_registry())
    # The skeleton (hcp check) has the real modules on the meta device.
    family = pipeline.model.family.build()
    skeleton = family.load_skeleton(str(toy_model_dir))
    assert {p.device.type for p in skeleton.transformer.parameters()} == {"meta"}
    assert family.size_multiple(family.load(str(toy_model_dir))) == 16


def test_a_lora_trains_on_the_toy_family(tmp_path: Path, toy_model_dir: Path, demo_data_dir: Path) -> None:
    sample = '[sample]\nprompts = ["a cat"]\nsteps = 2\n'
    pipeline = toy_pipeline(tmp_path, "pipe", toy_toml(toy_model_dir, demo_data_dir, tmp_path / "run", max_steps=3,
                                                         save_every=1, extra=sample))
    result = hcp_core.run(pipeline)
    assert result.step == 3 and math.isfinite(result.last_loss)
    first, last = checkpoint(tmp_path / "run", 2), checkpoint(tmp_path / "run", 3)
    ups = [k for k in last if k.endswith("lora_up.weight")]
    assert ups and all(k.startswith("lora/transformer.") for k in last), sorted(last)
    assert all(last[k].abs().sum() > 0 for k in ups)  # LoRA's up factors start at zero
    assert any(not torch.equal(first[k], last[k]) for k in last)
    assert list((tmp_path / "run" / "samples").rglob("*.png"))  # [sample] used the family's render
    assert any(Path(p).name == "lora.safetensors" for p in result.exports)


def test_a_resumed_toy_run_is_bit_identical(tmp_path: Path, toy_model_dir: Path, demo_data_dir: Path) -> None:
    straight = toy_pipeline(tmp_path, "straight", toy_toml(toy_model_dir, demo_data_dir, tmp_path / "straight",
                                                             max_steps=4, save_every=1))
    hcp_core.run(straight)
    first = toy_pipeline(tmp_path, "cut", toy_toml(toy_model_dir, demo_data_dir, tmp_path / "cut", max_steps=2, save_every=1))
    hcp_core.run(first)
    resumed = toy_pipeline(tmp_path, "resumed", toy_toml(toy_model_dir, demo_data_dir, tmp_path / "cut", max_steps=4,
                                                           save_every=1))
    assert hcp_core.run(resumed, resume="latest").step == 4
    assert_same_tensors(checkpoint(tmp_path / "cut", 4), checkpoint(tmp_path / "straight", 4))
