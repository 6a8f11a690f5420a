"""--size parsing and the area -> (H, W) search of the official get_size_less_than_area (spec §3.1, §6)."""
from __future__ import annotations

import pytest

from liveavatar_backend.errors import InputError
from liveavatar_backend.sizes import KNOWN_SIZES, MAX_AREA, MIN_AREA, _fallback_size, parse_size, target_size

# spec §3.1 worked examples: image (W, H) -> {--size: (H, W)}
WORKED_EXAMPLES = {
    (720, 400): {"720*400": (384, 704), "704*384": (384, 704), "688*368": (384, 640), "384*256": (256, 384)},
    (400, 720): {"720*400": (704, 384), "704*384": (704, 384), "688*368": (640, 384), "384*256": (384, 256)},
    (828, 772): {"720*400": (512, 512), "704*384": (512, 512), "688*368": (448, 512), "384*256": (256, 320)},
    (2720, 1568): {"720*400": (384, 704), "704*384": (384, 704), "688*368": (384, 640), "384*256": (256, 384)},
}


@pytest.mark.parametrize("image_wh,size,expected_hw",
                         [(wh, s, hw) for wh, row in WORKED_EXAMPLES.items() for s, hw in row.items()])
def test_worked_examples_of_the_spec(image_wh, size, expected_hw):
    width, height = image_wh
    assert target_size(height, width, KNOWN_SIZES[size]) == expected_hw


def test_known_sizes_are_the_official_presets_with_their_areas():
    assert len(KNOWN_SIZES) == 12
    assert KNOWN_SIZES["704*384"] == 270_336
    assert KNOWN_SIZES["720*400"] == 288_000
    assert KNOWN_SIZES["1280*720"] == KNOWN_SIZES["720*1280"] == 921_600
    assert list(KNOWN_SIZES)[:2] == ["720*1280", "1280*720"]


@pytest.mark.parametrize("image_hw", [(400, 720), (720, 400), (772, 828), (1568, 2720), (768, 1344),
                                      (100, 100), (3000, 400), (4000, 3000), (64, 64)])
@pytest.mark.parametrize("size", list(KNOWN_SIZES) + ["512*512", "64*64"])
def test_results_are_multiples_of_64_within_the_area(image_hw, size):
    area = KNOWN_SIZES.get(size) or parse_size(size)[0] * parse_size(size)[1]
    height, width = target_size(*image_hw, area)
    assert height % 64 == 0 and width % 64 == 0
    assert 64 <= height and 64 <= width and height * width <= area
    if image_hw[0] != image_hw[1] and height != width:          # orientation follows the image
        assert (height > width) == (image_hw[0] > image_hw[1])


def test_large_areas_are_not_capped_at_the_official_cache_limit():
    # the official code crashes above ≈288,000 px (spec §8.2); our caches follow the resolution
    assert target_size(768, 1344, KNOWN_SIZES["1280*720"]) == (704, 1280)
    assert target_size(768, 1344, KNOWN_SIZES["1024*704"]) == (640, 1088)


def test_small_image_is_not_upscaled_past_its_padded_size():
    # image area below the target: scales run from 1.0 down, first fit is the padded original
    assert target_size(300, 500, KNOWN_SIZES["704*384"]) == (320, 512)


def test_fallback_reproduces_the_official_formula():
    # floor(sqrt(area·aspect)) to 64 with aspect = W/H; capped at the image size when larger
    assert _fallback_size(400, 720, 270_336) == (384, 640)
    assert _fallback_size(100, 200, 270_336) == (64, 192)


def test_extreme_aspect_ratio_is_refused_instead_of_a_zero_side():
    with pytest.raises(InputError, match="aspect ratio"):
        target_size(1, 5000, 64 * 64)
    with pytest.raises(InputError, match="17x3000"):
        target_size(3000, 17, 64 * 64)


@pytest.mark.parametrize("bad_area", [MIN_AREA - 1, MAX_AREA + 1, 0])
def test_absurd_areas_are_refused(bad_area):
    with pytest.raises(InputError, match="outside"):
        target_size(400, 720, bad_area)


def test_empty_image_is_refused():
    with pytest.raises(InputError, match="at least one pixel"):
        target_size(0, 720, 270_336)


@pytest.mark.parametrize("text", ["384*256", "384x256", "384X256", "384\u00d7256", " 384 * 256 ", "384 x256"])
def test_parse_size_accepts_every_spelling(text):
    assert parse_size(text) == (384, 256)


def test_parse_size_keeps_width_first():
    assert parse_size("400*720") == (400, 720)


@pytest.mark.parametrize("text", ["384", "384*", "*256", "384-256", "384.5*256", "a*b", "384*256*3", "",
                                  "-384*256", "384 256"])
def test_parse_size_rejects_garbage_and_lists_the_forms_and_presets(text):
    with pytest.raises(InputError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message and "W*H" in message and "W×H" in message and "704*384" in message


def test_parse_size_rejects_non_strings_and_absurd_areas():
    with pytest.raises(InputError):
        parse_size(384)
    with pytest.raises(InputError, match="outside"):
        parse_size("32*32")
    with pytest.raises(InputError, match="outside"):
        parse_size("8192*4097")
    assert parse_size("4096*4096") == (4096, 4096)
