"""Exported custom words load in diffusers' ``load_textual_inversion`` (in a fresh process) and give
the text encoder output hcp gives for the same prompt."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from hcp_core.interfaces import AdapterContext
from hcp_core.models.custom_words import write_embedding
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.models.text_encoding import PromptEncoder
from hcp_plugins.adapters.prompt_tuning.adapter import PromptTuningAdapter
from hcp_plugins.adapters.prompt_tuning.config import PromptTuningConfig, TrainedWord
from train_support import hcp_env

PROMPTS = ["a photo of my-cat on the sofa", "my-cat, best quality, my-cat"]

DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    model, out, prompts, files = sys.argv[1], sys.argv[2], sys.argv[3].split("|"), sys.argv[4:]
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    result = {}
    for i, file in enumerate(files):
        pipe.load_textual_inversion(file)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        result[f"file{i}"] = embeds.contiguous()
        pipe.unload_textual_inversion()
    save_file(result, out)
    """
)


def test_exports_load_in_diffusers_and_match_hcp(tmp_path, demo_model_dir) -> None:
    models = load_models(demo_model_dir)
    dim = models.text_encoder.config.hidden_size
    write_embedding(tmp_path / "embs" / "my-cat.pt", "my-cat", torch.zeros(3, dim))
    write_embedding(tmp_path / "embs" / "other.pt", "other", torch.zeros(1, dim))
    adapter = PromptTuningAdapter(
        {"text_encoder": [PromptTuningConfig(emb_dir="embs", train=[TrainedWord("my-cat", 0.01)])]},
        context=AdapterContext(exp_dir=str(tmp_path / "exp"), base_dir=str(tmp_path)),
    )
    adapter.attach(models)
    with torch.no_grad():  # stands in for training: vectors unlike any token's
        adapter.words.params["my-cat"].copy_(torch.randn(3, dim, generator=torch.Generator().manual_seed(3)))
    exports = adapter.export(models, str(tmp_path / "exp"), None)
    pt, st = tmp_path / "exp" / "embeddings" / "my-cat.pt", tmp_path / "exp" / "embeddings" / "my-cat.safetensors"
    assert sorted(exports) == sorted([str(pt), str(st)])
    encoder = adapter.wrap_prompt_encoder(PromptEncoder(models.tokenizer, models.text_encoder))
    with torch.no_grad():
        ours = encoder(PROMPTS)

    out = tmp_path / "diffusers.safetensors"
    proc = subprocess.run([sys.executable, "-c", DIFFUSERS_SCRIPT, str(demo_model_dir), str(out), "|".join(PROMPTS), str(pt), str(st)],
                          env=hcp_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(out))
    for key in ("file0", "file1"):
        assert theirs[key].shape == ours.shape
        torch.testing.assert_close(theirs[key], ours, rtol=0, atol=1e-5)
    # the word really mattered: without it the output differs
    plain = PromptEncoder(models.tokenizer, models.text_encoder)
    adapter.words.remove()
    with torch.no_grad():
        assert not torch.allclose(plain(["a photo of cat on the sofa"]), ours[:1], atol=1e-3)
