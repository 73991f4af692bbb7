"""Prompt tuning: train custom words (textual-inversion embeddings), the ``[tokenizer_pt]`` section.

Only :mod:`.config` is imported at plugin discovery; :mod:`.adapter` (torch) loads when a pipeline
uses it. The custom-word machinery itself is :mod:`hcp_core.models.custom_words`, shared with
generation. See docs/prompt_tuning.md.
"""
