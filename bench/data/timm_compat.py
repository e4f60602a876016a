"""RandAugment at the paper's strongest settings, on today's Pillow.

timm's ``PosterizeIncreasing`` keeps ``4 - int(4 * level / 10)`` bits, so at magnitude 10 (reached by
``rand-m10-...``, and by ``mstd`` noise from lower m) it asks for 0 bits. Pillow used to return a black
image for that (what the authors' code ran on); Pillow >= 10 raises "bits must be between or equal to 1
and 8" and stops the fine-tune. ``patch_posterize`` restores the old result in timm's op table, once.
"""

from __future__ import annotations

import functools


def _posterize(img, bits_to_keep, **__):
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # no bit kept: every channel value masked to 0
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


@functools.cache
def patch_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize
