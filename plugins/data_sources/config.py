"""Config class of the built-in ``image_folder`` source (light: imported at registration)."""
from __future__ import annotations

from typing import Dict, List, Optional

import attrs

from hcp_core.config.validators import in_range, not_blank
from hcp_core.registry import TextTransformSpec

#: PIL's default decompression-bomb threshold.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: Times one epoch lists each image; more only inflates the epoch (use max_steps to train longer).
MAX_REPEAT = 10_000
#: The largest max_image_pixels: 2**31 px (a 46341 x 46341 image) already takes 6 GiB as RGB.
MAX_IMAGE_PIXELS_LIMIT = 2**31


@attrs.define
class ImageFolderConfig:
    """Images (png, jpg/jpeg, webp, bmp) in img_root, captioned by a .txt beside each image or a caption file.

    caption_file: .json or .yaml mapping image file name -> caption (default: img_root/image_captions.json
    when present). prompt_template: a template string, or a .txt file with one template per line (one
    is picked at random per sample). att_mask: folder of grayscale masks named like the images.
    word_names fill {word} placeholders of the templates. Relative paths resolve against the working
    directory, then against img_root.
    """

    img_root: str = attrs.field(validator=not_blank)
    caption_file: Optional[str] = attrs.field(default=None, validator=not_blank)
    prompt_template: str = "{caption}"
    repeat: int = attrs.field(default=1, validator=in_range(1, MAX_REPEAT))
    att_mask: Optional[str] = attrs.field(default=None, validator=not_blank)
    text_transforms: List[TextTransformSpec] = attrs.field(factory=list)
    word_names: Dict[str, str] = attrs.field(factory=dict)
    #: Also scan sub-folders (the mask folder and hidden folders are skipped). Off by default, as
    #: in the original tool, so a mask folder inside img_root is never mistaken for images.
    recursive: bool = False
    #: Larger images are skipped as possible decompression bombs.
    max_image_pixels: int = attrs.field(default=DEFAULT_MAX_IMAGE_PIXELS, validator=in_range(1, MAX_IMAGE_PIXELS_LIMIT))
