"""Helpers shared by the LoRA tests: a typical set of groups on the demo model, fixed inputs."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from hcp_core.interfaces import AdapterContext
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_plugins.adapters.lora.adapter import LoraAdapter, build_lora_adapter
from hcp_plugins.adapters.lora.config import LoraGroupConfig

#: Linear attention layers, every Conv2d (resnets, samplers, conv_in/out, 1x1 proj_in/out), a
#: float-rank feed-forward group and the text encoder: different ranks and alphas per group.
UNET_GROUPS = [
    LoraGroupConfig(layers=[r"re:.*\.attn[12]$"], rank=4, alpha=2.0, lr=1e-4),
    LoraGroupConfig(layers=[r"re:.*resnets\.\d+\.conv[12]$", "conv_in", "conv_out", r"re:.*samplers\.0\.conv$",
                            r"re:.*\.proj_(in|out)$"], rank=2, alpha=1.0, lr=2e-4),  # fmt: skip
    LoraGroupConfig(layers=[r"re:.*\.ff$"], rank=0.25, alpha=1.5, lr=5e-5),
]
TE_GROUPS = [LoraGroupConfig(layers=["encoder.layers"], rank=3, alpha=1.0, lr=1e-5)]


def sections(svd: bool = False) -> Dict[str, List[LoraGroupConfig]]:
    """The standard sections; ``svd`` adds svd_init to the (float-rank) feed-forward group."""
    unet = list(UNET_GROUPS)
    if svd:
        g = unet[2]
        unet[2] = LoraGroupConfig(layers=g.layers, rank=g.rank, alpha=g.alpha, lr=g.lr, svd_init=True)
    return {"unet": unet, "text_encoder": list(TE_GROUPS)}


def randomise(adapter: LoraAdapter, seed: int = 0, amount: float = 0.05) -> None:
    """Move every factor as training would (up away from zero), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in (layer.branch.up.weight, layer.branch.down.weight):
                p.add_(amount * torch.randn(p.shape, generator=g))


def trained_bundle(model_dir, exp_dir: str, *, svd: bool = False, options: Optional[Dict[str, Any]] = None,
                   seed: int = 0) -> Tuple[Any, LoraAdapter]:  # fmt: skip
    """The demo model with the standard LoRA groups attached and moved off their start."""
    bundle = load_models(str(model_dir))
    context = AdapterContext(exp_dir=exp_dir, clip_skip=1, resolution=(64, 64), seed=3,
                             extra={"lora": options or {}, "max_steps": 7})  # fmt: skip
    adapter = build_lora_adapter(sections(svd), context=context)
    adapter.attach(bundle)
    randomise(adapter, seed)
    return bundle, adapter


def fixed_inputs(bundle) -> Dict[str, torch.Tensor]:
    """Latents, timestep, text embeddings and token ids for comparing models."""
    g = torch.Generator().manual_seed(11)
    hidden = bundle.text_encoder.config.hidden_size
    ids = bundle.tokenizer(["a photo of a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return {
        "latents": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "context": torch.randn(1, 77, hidden, generator=g),
        "ids": ids,
    }


@torch.no_grad()
def outputs(unet, text_encoder, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(text encoder last hidden state, UNet prediction) on ``inputs``."""
    te = text_encoder(inputs["ids"])[0]
    pred = unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample
    return te, pred
