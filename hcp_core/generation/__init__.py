"""Image generation on diffusers pipelines: ``hcp generate`` and the samples rendered during training.

The modules split by weight: :mod:`.schedulers` and :mod:`.params` import no torch (the config
schema validates ``[sample]`` with them); :mod:`.metadata` reads and writes PNG text chunks;
:mod:`.render` and :mod:`.generate` load torch and diffusers.
"""
