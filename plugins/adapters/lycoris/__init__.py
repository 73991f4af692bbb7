"""LyCORIS's LoHa and LoKr for the UNet, transformer and text encoders: ``[[lycoris_unet]]`` ...
groups with ``algo = "loha" | "lokr"``.

Built on the LoRA adapter (layer selection, host hooks, seeding, state, kohya names, file
writing); only :mod:`.config` is imported at plugin discovery. See docs/lycoris.md.
"""
