"""An example third-party hcp plugin.

It adds two components, registered in :mod:`hcp_plugin_example.plugin`:

- bucket ``multiple_of`` (:class:`hcp_plugin_example.buckets.MultipleOfBucket`): every image keeps
  its aspect ratio, scaled so its longer side is ``max_side`` and both sides rounded down to a
  multiple of ``multiple``;
- text transform ``caption_prefix`` (:class:`hcp_plugin_example.text.CaptionPrefix`): puts a fixed
  text (a trigger word, quality tags) in front of every caption.
"""

__version__ = "0.1.0"
