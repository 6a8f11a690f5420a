"""The `--size` setting and the output resolution it leads to (spec §3.1, §6).

Live Avatar never renders at the size the user names. The official code looks up only the *area*
W·H of `--size`, then picks the largest (H, W) with the portrait's aspect ratio whose sides are
multiples of 64 and whose product stays within that area (`get_size_less_than_area` in
`liveavatar/models/wan/causal_s2v_pipeline.py`). The orientation therefore always follows the
image: `--size 704*384` gives a 704-wide video for a landscape portrait and a 704-tall one for a
portrait-format picture. This module reproduces that search exactly, so that our videos have the
official sizes for the same inputs.
"""
from __future__ import annotations

import math
import re

from .constants import SIZE_DIVISOR
from .errors import InputError

# The official presets, `MAX_AREA_CONFIGS` in liveavatar/models/wan/wan_2_2/configs/__init__.py
# (spec §6), as "W*H" -> area. Only the area matters (see the module docstring).
KNOWN_SIZES: dict[str, int] = {
    name: int(w) * int(h)
    for name in ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
                 "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256")
    for w, h in [name.split("*")]
}

# Areas we refuse as absurd. The official code only works up to ≈288,000 px because its sink
# cache has a fixed number of rows (spec §8.2); our caches are sized from the resolution, so the
# bounds here only catch typos: below one 64×64 tile nothing can be generated, and above
# 4096×4096 the 14B model would need far more memory than any GPU has.
MIN_AREA = SIZE_DIVISOR * SIZE_DIVISOR
MAX_AREA = 4096 * 4096

# The official scale search (spec §3.1): 100 evenly spaced scales from the no-padding scale down
# to the maximal-padding scale; when the image is already small enough it scans [0.1, 1.0].
_SCALE_SEARCH_STEPS = 100
_SMALL_IMAGE_MIN_SCALE = 0.1

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[*xX\u00d7]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """`"W*H"` -> (width, height). Accepts `*`, `x`, `X` or `×` between the numbers, spaces allowed.

    Any W and H are accepted (not only the presets) because only their product is used."""
    match = _SIZE_PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(
            f"size {text!r} is not understood; write it as W*H, WxH or W×H in pixels (e.g. 704*384). "
            f"Official presets: {', '.join(KNOWN_SIZES)}")
    width, height = int(match.group(1)), int(match.group(2))
    check_area(width * height, f"size {text!r}")
    return width, height


def check_area(area: int, what: str = "size area") -> None:
    """Raise InputError unless MIN_AREA <= area <= MAX_AREA (see their comments)."""
    if not MIN_AREA <= area <= MAX_AREA:
        raise InputError(
            f"{what}: an area of {area} px is outside {MIN_AREA}…{MAX_AREA} "
            f"(64*64 … 4096*4096); pick a size such as 704*384 or 384*256")


def target_size(image_height: int, image_width: int, area: int) -> tuple[int, int]:
    """The (H, W) the official `get_size_less_than_area(h, w, area, divisor=64)` returns.

    Both sides are multiples of 64 and H·W <= area. The portrait is later resized so its short
    side matches min(H, W) and centre-cropped (or zero-padded) to (H, W); see image.py."""
    if image_height < 1 or image_width < 1:
        raise InputError(f"portrait is {image_width}x{image_height} px; it needs at least one pixel")
    check_area(area)
    image_area = image_height * image_width
    if image_area <= area:
        min_scale, max_scale = _SMALL_IMAGE_MIN_SCALE, 1.0
    else:
        # Smallest useful scale: the one at which rounding both sides up by up to 63 px
        # ("maximal padding") just fills the area: a·s² + b·s + d² = area, positive root.
        # The official formula writes the discriminant as b² − 2ac (not 4ac); kept as is.
        d = SIZE_DIVISOR - 1
        a, b, c = image_area, d * (image_height + image_width), d ** 2 - area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(area / image_area)

    for i in range(_SCALE_SEARCH_STEPS):
        scale = max_scale - (max_scale - min_scale) * i / _SCALE_SEARCH_STEPS
        height = _round_up(int(image_height * scale))
        width = _round_up(int(image_width * scale))
        if height * width <= area:
            return _checked(height, width, image_height, image_width)

    return _checked(*_fallback_size(image_height, image_width, area), image_height, image_width)


def _fallback_size(image_height: int, image_width: int, area: int) -> tuple[int, int]:
    """The official fallback when no scale of the search fits: sides from sqrt(area·aspect),
    floored to 64, capped at the image size. Exhaustive scans (all images up to 400×400 at the
    smallest areas, random ones up to 3000×3000 at the preset areas) never reach it; it is kept
    so the function reproduces the official one in full."""
    aspect = image_width / image_height
    width = int((area * aspect) ** 0.5 // SIZE_DIVISOR * SIZE_DIVISOR)
    height = int((area / aspect) ** 0.5 // SIZE_DIVISOR * SIZE_DIVISOR)
    if width >= image_width or height >= image_height:
        width = int(image_width // SIZE_DIVISOR * SIZE_DIVISOR)
        height = int(image_height // SIZE_DIVISOR * SIZE_DIVISOR)
    return height, width


def _round_up(pixels: int) -> int:
    return -(-pixels // SIZE_DIVISOR) * SIZE_DIVISOR


def _checked(height: int, width: int, image_height: int, image_width: int) -> tuple[int, int]:
    """The official code can return a 0-pixel side for extreme aspect ratios; refuse those."""
    if height < SIZE_DIVISOR or width < SIZE_DIVISOR:
        raise InputError(
            f"portrait is {image_width}x{image_height} px: its aspect ratio is too extreme for this "
            f"size (one side would be {min(height, width)} px); crop the image or use a larger size")
    return height, width
