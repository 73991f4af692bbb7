"""Run as a script in a fresh process: the demo model's denoising error with a LoRA file loaded by
diffusers' own `load_lora_weights`, at several LoRA weights. Prints {weight: mean error} as JSON.
"""
import json
import os
import sys
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

model, lora, data, weights = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.load_lora_weights(lora, adapter_name="hcp")
images = sorted(p for p in data.iterdir() if p.suffix in (".png", ".jpg"))
g = torch.Generator().manual_seed(0)
cases = []
for p in images:
    im = Image.open(p).convert("RGB").resize((64, 64))
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    caption = "a picture of " + p.with_suffix(".txt").read_text()
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    for _ in range(8):
        t = torch.randint(50, 950, (1,), generator=g)
        n = torch.randn(lat.shape, generator=g)
        cases.append((lat, n, t, caption))
out = {}
for w in weights:
    pipe.set_adapters(["hcp"], adapter_weights=[w])
    errs = []
    with torch.no_grad():
        for lat, n, t, caption in cases:
            emb = pipe.encode_prompt(caption, "cpu", 1, False)[0]  # diffusers' own prompt path
            noisy = pipe.scheduler.add_noise(lat, n, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=emb).sample
            errs.append(((pred - n) ** 2).mean().item())
    out[str(w)] = sum(errs) / len(errs)
print(json.dumps(out))
