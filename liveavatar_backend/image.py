"""The portrait: loading it from a file, and turning it into the pixels the VAE encodes (spec §3.1).

The official code does `Image.open(path).convert('RGB')`, then torchvision's
`Resize(min(H, W))` (short side to min(H, W), bilinear with antialiasing, long side truncated to an
int), `CenterCrop((H, W))`, `ToTensor()` and `x·2 − 1`. When the resized long side is shorter than
the target, CenterCrop pads with 0, which becomes −1 (black bars) after normalisation; we keep that
for parity. We do the same steps without torchvision:
* a PIL image is resized with PIL's bilinear filter, which is exactly what torchvision does for PIL
  images, so file inputs match the official pixels bit for bit;
* a float tensor (ComfyUI's IMAGE layout) is resized with `torch.nn.functional.interpolate`
  (bilinear, antialias, align_corners=False), exactly what torchvision does for tensors.
The two paths differ only by PIL's 8-bit rounding (well under 1 % of the range; measured in the
tests).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Below this on the short side, faces lose detail even at the smallest preset (a warning, not an error).
SMALL_PORTRAIT_PX = 512
# What transparent parts of a portrait become: white, like the neutral backdrop of a studio portrait
# and like the page a cut-out is normally shown on. (The official convert('RGB') would expose
# whatever colour happens to be stored under alpha = 0, often black or smeared edges.)
TRANSPARENT_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def load_portrait(path: str | os.PathLike, warn: Callable[[str], None] = _warn) -> Image.Image:
    """Decode an image file (JPG, PNG, WebP, … whatever Pillow reads) to an upright 8-bit RGB image;
    `warn` hears what is usable but poor (a portrait below 512 px).

    EXIF orientation is applied (phone photos are stored sideways with a rotation tag; the official
    code ignores the tag and would animate a sideways face). Transparency is composited on white,
    16-bit grayscale is scaled to 8 bits, CMYK and palette images are converted."""
    if not os.path.isfile(path):
        what = "is a folder; give the portrait file in it" if os.path.isdir(path) else "no such file; check the path"
        raise InputError(f"image {os.fspath(path)!r}: {what}")
    try:
        with Image.open(path) as opened:
            rgb = to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        unknown = isinstance(err, UnidentifiedImageError)
        kind = "not an image Pillow can read" if unknown else "could not be decoded"
        raise InputError(f"image {os.fspath(path)!r}: {kind} ({err}); use a JPG, PNG or WebP file") from err
    if min(rgb.size) < SMALL_PORTRAIT_PX:
        warn(f"portrait {os.fspath(path)!r} is {rgb.width}x{rgb.height} px; below {SMALL_PORTRAIT_PX} px on "
             "the short side the face loses detail")
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (see load_portrait for the choices)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a nearly white picture); scale instead.
        levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_portrait(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Portrait -> float32 [3, height, width] in [−1, 1], RGB, the official way (module docstring).

    `image` is a PIL image or a float tensor [H, W, 3] (or [1, H, W, 3]) with values in [0, 1],
    the layout of a ComfyUI IMAGE frame. The tensor stays on its device."""
    if height < 1 or width < 1:
        raise InputError(f"target size {width}x{height}: both sides must be positive")
    short_side = min(height, width)
    if isinstance(image, Image.Image):
        image = to_rgb(image)
        new_h, new_w = _resized_hw(image.height, image.width, short_side)
        if (new_h, new_w) != (image.height, image.width):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32).div(255)
    elif isinstance(image, torch.Tensor):
        pixels = _chw_from_comfy(image)
        new_h, new_w = _resized_hw(pixels.shape[1], pixels.shape[2], short_side)
        if (new_h, new_w) != tuple(pixels.shape[1:]):
            pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear",
                                   align_corners=False, antialias=True)[0]
    else:
        raise InputError(f"portrait is a {type(image).__name__}; give a PIL image or an image tensor [H, W, 3]")
    return center_crop_or_pad(pixels, height, width) * 2 - 1


def _chw_from_comfy(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] != 3 or not image.is_floating_point():
        raise InputError(f"portrait tensor has shape {tuple(image.shape)} and dtype {image.dtype}; "
                         f"expected one RGB frame [H, W, 3] of floats in [0, 1] (ComfyUI IMAGE)")
    return image.permute(2, 0, 1).to(torch.float32)


def _resized_hw(image_h: int, image_w: int, short_side: int) -> tuple[int, int]:
    """torchvision Resize(int): the short side becomes `short_side`, the long side int(·)-truncated."""
    if image_w <= image_h:
        return int(short_side * image_h / image_w), short_side
    return short_side, int(short_side * image_w / image_h)


def center_crop_or_pad(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CenterCrop on [..., H, W]: zero-pad any side shorter than the target (the
    smaller half of the padding before, the larger after), then crop at round((size − target) / 2)."""
    image_h, image_w = pixels.shape[-2:]
    if height > image_h or width > image_w:
        pad_w, pad_h = max(width - image_w, 0), max(height - image_h, 0)
        pixels = F.pad(pixels, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=0.0)
        image_h, image_w = pixels.shape[-2:]
    top = int(round((image_h - height) / 2.0))    # Python's round: halves go to the even number
    left = int(round((image_w - width) / 2.0))
    return pixels[..., top:top + height, left:left + width]
