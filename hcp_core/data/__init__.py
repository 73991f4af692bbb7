"""Datasets: scanning sources, buckets, prompts, attention masks, batches, the latent cache.

Modules (import what you need; this package imports nothing heavy itself):

- :mod:`.images`: header sizes, EXIF orientation, colour modes, decompression bombs
- :mod:`.captions`, :mod:`.prompts`, :mod:`.masks`, :mod:`.geometry`: the pieces of a sample
- :mod:`.prepare`: scan + verify + bucket one ``[data.<name>]`` (no torch; used by ``hcp check``)
- :mod:`.dataset`, :mod:`.sampler`, :mod:`.loader`: the torch dataset, the batch order, and
  :func:`~hcp_core.data.loader.build_train_data` that the training loop calls
- :mod:`.latent_cache`: VAE latents kept on disk
- :mod:`.report`: the bucket table and problem list (``hcp check``)
"""
