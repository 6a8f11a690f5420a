"""Portrait loading and preprocessing (spec §3.1): resize short side, centre crop with zero padding, [-1, 1]."""
from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar_backend.errors import InputError
from liveavatar_backend.image import center_crop_or_pad, load_portrait, preprocess_portrait
from liveavatar_backend.sizes import KNOWN_SIZES, target_size

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "examples"
EXAMPLE_IMAGES = sorted(EXAMPLES.glob("*.jpg")) + sorted(EXAMPLES.glob("*.png"))


def _white_tensor(height: int, width: int) -> torch.Tensor:
    return torch.ones(height, width, 3)


def _black_columns(pixels: torch.Tensor) -> tuple[int, int]:
    """(count on the left, count on the right) of columns that are −1 everywhere."""
    black = (pixels == -1).all(dim=0).all(dim=0).tolist()
    left = black.index(False)
    right = black[::-1].index(False)
    return left, right


# ----------------------------------------------------------------------- the spec's padding examples
@pytest.mark.parametrize("as_pil", [False, True])
def test_720x400_to_384x704_pads_6_columns_left_and_7_right(as_pil):
    image = _white_tensor(400, 720)
    if as_pil:
        image = Image.new("RGB", (720, 400), (255, 255, 255))
    assert target_size(400, 720, KNOWN_SIZES["704*384"]) == (384, 704)
    pixels = preprocess_portrait(image, 384, 704)
    assert pixels.shape == (3, 384, 704) and pixels.dtype == torch.float32
    # resized to 691×384 (384·720/400 = 691.2 truncated); 13 columns of zero padding, smaller half first
    assert _black_columns(pixels) == (6, 7)
    assert torch.allclose(pixels[:, :, 6:697], torch.ones(3, 384, 691), atol=1e-6)


def test_2720x1568_to_384x704_pads_19_columns_each_side():
    pixels = preprocess_portrait(_white_tensor(1568, 2720), 384, 704)
    assert _black_columns(pixels) == (19, 19)     # 384·2720/1568 = 666.1 -> 666; 704 − 666 = 38


def test_portrait_orientation_pads_rows():
    pixels = preprocess_portrait(_white_tensor(720, 400), 704, 384)
    rows_black = (pixels == -1).all(dim=0).all(dim=1).tolist()
    assert rows_black[:6] == [True] * 6 and rows_black[6] is False
    assert rows_black[-7:] == [True] * 7 and rows_black[-8] is False


def test_828x772_is_cropped_not_padded():
    pixels = preprocess_portrait(_white_tensor(772, 828), 512, 512)
    assert (pixels > 0.99).all()


def test_crop_offsets_round_halves_to_even_like_torchvision():
    columns = torch.arange(9.0).expand(1, 1, 9)
    assert center_crop_or_pad(columns, 1, 4)[0, 0].tolist() == [2, 3, 4, 5]      # (9−4)/2 = 2.5 -> 2
    columns = torch.arange(7.0).expand(1, 1, 7)
    assert center_crop_or_pad(columns, 1, 4)[0, 0].tolist() == [2, 3, 4, 5]      # (7−4)/2 = 1.5 -> 2
    padded = center_crop_or_pad(torch.ones(1, 2, 3), 5, 3)
    assert padded[0, :, 0].tolist() == [0, 1, 1, 0, 0]                          # 1 row above, 2 below


# ----------------------------------------------------------------------- parity with torchvision
def _torchvision_official(image, height: int, width: int) -> torch.Tensor:
    transforms = pytest.importorskip("torchvision.transforms")
    if isinstance(image, torch.Tensor):
        resized = transforms.Resize(min(height, width))(image.permute(2, 0, 1))
        return transforms.CenterCrop((height, width))(resized) * 2 - 1
    resized = transforms.Resize(min(height, width))(image)
    return transforms.ToTensor()(transforms.CenterCrop((height, width))(resized)) * 2 - 1


@pytest.mark.parametrize("path", EXAMPLE_IMAGES, ids=lambda p: p.name)
@pytest.mark.parametrize("size", ["704*384", "384*256", "1024*704"])
def test_example_images_match_torchvision_exactly(path, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = load_portrait(path)
    height, width = target_size(image.height, image.width, KNOWN_SIZES[size])
    ours_pil = preprocess_portrait(image, height, width)
    assert torch.equal(ours_pil, _torchvision_official(image, height, width))       # the official path
    as_tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
    ours_tensor = preprocess_portrait(as_tensor, height, width)
    assert torch.equal(ours_tensor, _torchvision_official(as_tensor, height, width))
    # PIL (8-bit) and tensor (float) resizing differ by at most about one grey level of 255
    assert (ours_pil - ours_tensor).abs().max().item() <= 1.01 * 2 / 255


@pytest.mark.parametrize("image_hw,target_hw", [((400, 720), (384, 704)), ((1568, 2720), (384, 704)),
                                                ((301, 517), (320, 512)), ((517, 301), (512, 320)),
                                                ((64, 64), (128, 64)), ((999, 333), (256, 64))])
def test_random_tensors_match_torchvision(image_hw, target_hw):
    image = torch.rand(*image_hw, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(preprocess_portrait(image, *target_hw), _torchvision_official(image, *target_hw))


def test_tensor_input_checks():
    assert preprocess_portrait(torch.rand(1, 40, 60, 3), 64, 64).shape == (3, 64, 64)
    assert preprocess_portrait(torch.rand(40, 60, 3, dtype=torch.float16), 64, 64).dtype == torch.float32
    for bad in (torch.rand(40, 60), torch.rand(3, 40, 60), torch.rand(2, 40, 60, 3),
                torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8)):
        with pytest.raises(InputError, match="H, W, 3"):
            preprocess_portrait(bad, 64, 64)
    with pytest.raises(InputError, match="PIL image"):
        preprocess_portrait(np.zeros((40, 60, 3), np.float32), 64, 64)


def test_output_range_and_rgb_order():
    image = Image.new("RGB", (80, 64), (255, 0, 0))
    pixels = preprocess_portrait(image, 64, 64)
    assert pixels.min().item() == -1.0 and pixels.max().item() == 1.0
    assert (pixels[0] == 1).all() and (pixels[1] == -1).all() and (pixels[2] == -1).all()


# ----------------------------------------------------------------------- loading files
def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((600, 600, 4), np.uint8)
    rgba[:300] = (0, 0, 0, 0)            # transparent, black underneath
    rgba[300:] = (10, 200, 30, 255)      # opaque green
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    loaded = np.asarray(load_portrait(tmp_path / "cutout.png"))
    assert loaded.shape == (600, 600, 3)
    assert (loaded[:300] == 255).all() and (loaded[300:] == (10, 200, 30)).all()


def test_half_transparent_la_and_palette_transparency(tmp_path):
    Image.new("LA", (600, 600), (0, 128)).save(tmp_path / "la.png")
    assert np.asarray(load_portrait(tmp_path / "la.png"))[0, 0].tolist() == [127, 127, 127]
    palette = Image.new("P", (600, 600), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.paste(1, (0, 0, 600, 300))
    palette.save(tmp_path / "p.png", transparency=0)
    loaded = np.asarray(load_portrait(tmp_path / "p.png"))
    assert loaded[0, 0].tolist() == [255, 0, 0] and loaded[599, 0].tolist() == [255, 255, 255]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.new("L", (600, 600), 77).save(tmp_path / "gray.jpg", quality=100)
    loaded = np.asarray(load_portrait(tmp_path / "gray.jpg"))
    assert loaded.shape == (600, 600, 3) and (loaded == 77).all()


def test_cmyk_jpeg_is_converted(tmp_path):
    Image.new("CMYK", (600, 600), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    loaded = load_portrait(tmp_path / "cmyk.jpg")
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded).astype(int) - (255, 0, 0)).max() <= 2


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.full((600, 600), 32896, np.uint16)     # 32896 / 257 = 128
    levels[:, :300] = 65535
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    loaded = np.asarray(load_portrait(tmp_path / "gray16.png"))
    assert (loaded[:, :300] == 255).all() and (loaded[:, 300:] == 128).all()


def _write_rgb16_png(path: Path, pixels: np.ndarray) -> None:
    """A minimal 16-bit RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    pixels = np.zeros((520, 530, 3), np.uint16)
    pixels[...] = (65535, 32896, 2570)
    _write_rgb16_png(tmp_path / "rgb16.png", pixels)
    loaded = np.asarray(load_portrait(tmp_path / "rgb16.png"))
    assert loaded.shape == (520, 530, 3) and (loaded == (255, 128, 10)).all()


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    stored = np.zeros((600, 800, 3), np.uint8)
    stored[:, :400] = (255, 0, 0)      # left half red
    stored[:, 400:] = (0, 0, 255)      # right half blue
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6                    # "rotate 90° clockwise to display"
    image.save(tmp_path / f"phone.{suffix}", exif=exif.tobytes())
    loaded = load_portrait(tmp_path / f"phone.{suffix}")
    assert loaded.size == (600, 800)    # width × height, upright: taller than wide
    top, bottom = np.asarray(loaded)[100, 300], np.asarray(loaded)[700, 300]
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50   # left became top


def test_webp(tmp_path):
    Image.new("RGB", (640, 520), (20, 40, 200)).save(tmp_path / "face.webp", lossless=True)
    loaded = load_portrait(tmp_path / "face.webp")
    assert loaded.size == (640, 520) and np.asarray(loaded)[5, 5].tolist() == [20, 40, 200]


def test_small_portrait_warns_and_large_does_not(tmp_path):
    Image.new("RGB", (700, 511)).save(tmp_path / "small.png")
    Image.new("RGB", (512, 900)).save(tmp_path / "large.png")
    with pytest.warns(UserWarning, match="small.png.*700x511"):
        load_portrait(tmp_path / "small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_portrait(tmp_path / "large.png")


def test_example_files_load_in_place():
    man = load_portrait(EXAMPLES / "man.png")
    assert man.mode == "RGB" and man.size == (1344, 768)
    with pytest.warns(UserWarning, match="boy.jpg"):
        assert load_portrait(EXAMPLES / "boy.jpg").size == (720, 400)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(InputError, match="nowhere.png.*no such file"):
        load_portrait(tmp_path / "nowhere.png")
    with pytest.raises(InputError, match="is a folder"):
        load_portrait(tmp_path)          # a folder is not an image file


def test_unreadable_and_truncated_files_name_it(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(InputError, match="notes.jpg.*not an image"):
        load_portrait(tmp_path / "notes.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg.*could not be decoded"):
        load_portrait(tmp_path / "cut.jpg")
