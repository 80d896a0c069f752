"""Tests for visualprm_ray.model.tiling: pixel-exact agreement with a plain reference of the upstream algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visualprm_ray.model.tiling import _candidate_grids, choose_grid, num_tiles_for, tile_image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Plain reference: the upstream InternVL `dynamic_preprocess` written the most obvious way (one PIL crop per
# tile, one np.asarray per crop).  Deliberately independent of the module under test.
# ----------------------------------------------------------------------------------------------------
def reference_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def reference_tiles(
    image: Image.Image, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True, min_num: int = 1
) -> np.ndarray:
    image = image.convert("RGB")
    orig_width, orig_height = image.size
    cols, rows = reference_grid(orig_width, orig_height, min_num, max_num, image_size)
    # Upstream calls resize() without a filter; for RGB, Pillow's default is bicubic.
    resized_img = image.resize((image_size * cols, image_size * rows))
    processed = []
    for i in range(cols * rows):
        box = (
            (i % cols) * image_size,
            (i // cols) * image_size,
            ((i % cols) + 1) * image_size,
            ((i // cols) + 1) * image_size,
        )
        processed.append(np.asarray(resized_img.crop(box)))
    if use_thumbnail and len(processed) != 1:
        processed.append(np.asarray(image.resize((image_size, image_size))))
    return np.stack(processed)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    # Random noise so that any misplaced tile, transposed axis or wrong filter changes pixels.
    rng = np.random.default_rng(seed + 7919 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------
# 1. Pixel-exact agreement with the reference over shapes and settings.
# ----------------------------------------------------------------------------------------------------
SHAPES = [
    (1, 1),
    (2, 2),
    (3, 7),
    (10, 500),  # extreme portrait -> (1, 12)
    (500, 10),  # extreme landscape -> (12, 1)
    (4000, 100),
    (100, 4000),
    (448, 448),  # exactly one tile -> no thumbnail
    (896, 448),
    (1344, 896),
    (896, 896),  # ties (1,1), (2,2), (3,3): area rule picks (2,2)
    (633, 633),  # just below the (2,2) threshold: 633^2 = 400689 <= 0.5*448^2*4 = 401408
    (634, 634),  # just above: 634^2 = 401956
    (950, 950),  # just below the (3,3) threshold: 950^2 = 902500 <= 903168
    (951, 951),  # just above: 951^2 = 904401
    (1266, 633),  # aspect 2 tie (2,1)/(4,2): 801378 <= 802816 -> (2,1)
    (1268, 634),  # 803912 > 802816 -> (4,2)
    (1920, 1080),
    (1080, 1920),
    (800, 600),
    (300, 1200),
    (1001, 333),
]


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_matches_reference_default(width: int, height: int) -> None:
    img = noise_image(width, height)
    expected = reference_tiles(img)
    got = tile_image(img)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert len(got) == num_tiles_for(width, height)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (10, 500), (1920, 1080), (896, 896), (1344, 896)])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tiles": 1},
        {"max_tiles": 6},
        {"max_tiles": 12, "use_thumbnail": False},
        {"max_tiles": 6, "use_thumbnail": False},
        {"max_tiles": 12, "min_tiles": 4},
        {"max_tiles": 4, "min_tiles": 4},
        {"max_tiles": 12, "tile_size": 224},
    ],
)
def test_matches_reference_settings(width: int, height: int, kwargs: dict) -> None:
    img = noise_image(width, height)
    expected = reference_tiles(
        img,
        max_num=kwargs["max_tiles"],
        image_size=kwargs.get("tile_size", 448),
        use_thumbnail=kwargs.get("use_thumbnail", True),
        min_num=kwargs.get("min_tiles", 1),
    )
    got = tile_image(img, **kwargs)
    np.testing.assert_array_equal(got, expected)
    assert len(got) == num_tiles_for(width, height, **kwargs)


def test_small_tile_size_brute_force() -> None:
    # Tiny tiles make exact area ties (area == 0.5 * ts^2 * c * r, where '>' vs '>=' matters) reachable;
    # compare every shape up to 12x12 against the reference at tile size 6 (e.g. 9x8 sits exactly on the
    # (2,2) threshold 72).
    for max_tiles in (1, 4, 12):
        for width in range(1, 13):
            for height in range(1, 13):
                img = noise_image(width, height, seed=max_tiles)
                expected = reference_tiles(img, max_num=max_tiles, image_size=6)
                np.testing.assert_array_equal(tile_image(img, max_tiles, 6), expected)


def test_tile_counts_known_sizes() -> None:
    # 1920x1080 (aspect 1.778): (2,1) is the closest ratio allowed (diff 0.222; (3,2) is 0.278, 5:3 and
    # 16:9 need more than 12 tiles); (4,2) ties it and the image is big enough, so 8 tiles + thumbnail = 9.
    # (13 tiles is what a 4:3 image such as 800x600 gets: (4,3) + thumbnail.)  GotOcr2ImageProcessor agrees
    # on both counts: see test_matches_transformers_got_ocr2.
    assert num_tiles_for(1920, 1080) == 9
    assert len(tile_image(noise_image(1920, 1080))) == 9
    assert num_tiles_for(800, 600) == 13
    assert num_tiles_for(448, 448) == 1
    assert num_tiles_for(896, 896) == 5
    assert num_tiles_for(1920, 1080, use_thumbnail=False) == 8
    assert num_tiles_for(1920, 1080, max_tiles=1) == 1


# ----------------------------------------------------------------------------------------------------
# 2. Image modes: whatever the mode, the result is PIL's convert("RGB") then tiling.
# ----------------------------------------------------------------------------------------------------
def _mode_image(mode: str) -> Image.Image:
    # 460x300 -> (3,2) grid + thumbnail: several tiles, yet small enough to keep 12 modes fast.
    base = noise_image(460, 300, seed=3)
    if mode == "I;16":
        # Values straddle 255: Pillow's I;16 -> RGB clips rather than rescales, and so must we (as upstream).
        rng = np.random.default_rng(5)
        return Image.fromarray(rng.integers(0, 512, (300, 460), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 2)
    if mode == "P":
        img = base.quantize(64)
        img.info["transparency"] = 0  # transparency must not be composited (transformers would)
        return img
    return base.convert(mode)


MODES = ["RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "YCbCr", "1", "I", "I;16", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_convert_rgb(mode: str) -> None:
    img = _mode_image(mode)
    assert img.mode == mode
    # reference_tiles starts with img.convert("RGB"), exactly as upstream.
    np.testing.assert_array_equal(tile_image(img), reference_tiles(img))


def test_alpha_is_dropped_not_composited() -> None:
    # Upstream's convert("RGB") keeps the colour under a fully transparent pixel; compositing on white (what
    # transformers' convert_to_rgb does) would give 255s here.
    img = Image.new("RGBA", (500, 300), (200, 10, 30, 0))
    tiles = tile_image(img)
    assert (tiles[..., 0] == 200).all() and (tiles[..., 1] == 10).all() and (tiles[..., 2] == 30).all()


def test_input_image_not_modified() -> None:
    img = noise_image(640, 480)
    before = np.asarray(img).copy()
    tile_image(img)
    assert img.mode == "RGB" and img.size == (640, 480)
    np.testing.assert_array_equal(np.asarray(img), before)


# ----------------------------------------------------------------------------------------------------
# 3. choose_grid with hand-computed expectations.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "kwargs", "expected"),
    [
        # Aspect 1: (1,1) has diff 0 first; (2,2) ties but 448^2 = 200704 is not > 0.5*448^2*4.
        (448, 448, {}, (1, 1)),
        # 896^2 = 802816 > 401408 so (2,2) replaces (1,1); (3,3) needs > 903168, so it stays (2,2).
        (896, 896, {}, (2, 2)),
        (633, 633, {}, (1, 1)),  # 400689 <= 401408
        (634, 634, {}, (2, 2)),  # 401956 > 401408
        (950, 950, {}, (2, 2)),  # 902500 <= 903168
        (951, 951, {}, (3, 3)),  # 904401 > 903168
        # Aspect 1.778: (2,1) diff 0.222 beats (3,2) 0.278; (4,2) ties (2,1) and 2073600 > 802816.
        (1920, 1080, {}, (4, 2)),
        # Same, but with at most 6 tiles (4,2) is not a candidate.
        (1920, 1080, {"max_tiles": 6}, (2, 1)),
        # 4:3 exactly: only (4,3) has diff 0 within 12 tiles.
        (800, 600, {}, (4, 3)),
        (600, 800, {}, (3, 4)),
        # Aspect 0.25: (1,4) exact; (2,8) would need 16 tiles.
        (300, 1200, {}, (1, 4)),
        # Extreme ratios clamp to the most elongated grid allowed.
        (10, 500, {}, (1, 12)),
        (4000, 100, {}, (12, 1)),
        (4000, 100, {"max_tiles": 6}, (6, 1)),
        # With max_tiles=1 there is only (1,1).
        (4000, 100, {"max_tiles": 1}, (1, 1)),
        # Exactly on the threshold (tile 6, (2,2) threshold 0.5*36*4 = 72 = 9*8): the rule is strict '>'.
        (9, 8, {"max_tiles": 4, "tile_size": 6}, (1, 1)),
        (9, 9, {"max_tiles": 4, "tile_size": 6}, (2, 2)),  # 81 > 72
        # Order-sensitive tie: only 4-tile grids, aspect 2.5 is 1.5 away from both (4,1) and (2,2), and the
        # image is tiny so the first visited wins.  Upstream's set order visits (4,1) first.  (transformers'
        # GotOcr2ImageProcessor visits (1,4), (2,2), (4,1) and returns (2,2) here: it is not upstream.)
        (10, 4, {"min_tiles": 4, "max_tiles": 4}, (4, 1)),
        # Same tie on a big image: the later grid (2,2) replaces (4,1) since 1100*440 > 0.5*448^2*4.
        (1100, 440, {"min_tiles": 4, "max_tiles": 4}, (2, 2)),
    ],
)
def test_choose_grid_hand_computed(width: int, height: int, kwargs: dict, expected: tuple[int, int]) -> None:
    assert choose_grid(width, height, **kwargs) == expected


def test_candidate_order_pinned() -> None:
    # The equal-area order comes from CPython's set iteration; pin it so a change (new Python, a refactor to a
    # list comprehension) that would silently alter tie-breaking is caught.
    assert _candidate_grids(1, 12) == (
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
        (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
        (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
    )  # fmt: skip


def test_choose_grid_matches_reference_brute_force() -> None:
    limits = [(1, 12), (1, 6), (1, 1), (2, 2), (3, 3), (4, 4), (2, 12), (6, 6), (12, 12)]
    for min_tiles, max_tiles in limits:
        for width in [*range(1, 60), 100, 333, 448, 449, 633, 634, 896, 1000, 1280, 1920, 4000]:
            for height in [*range(1, 60, 3), 100, 448, 720, 1080, 4000]:
                assert choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles) == reference_grid(
                    width, height, min_tiles, max_tiles, 448
                ), (width, height, min_tiles, max_tiles)


@pytest.mark.parametrize(
    "kwargs", [{"min_tiles": 0}, {"min_tiles": 5, "max_tiles": 4}, {"max_tiles": 0}, {"tile_size": 0}]
)
def test_invalid_limits_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        choose_grid(100, 100, **kwargs)


def test_empty_image_raises() -> None:
    with pytest.raises(ValueError):
        choose_grid(0, 10)


# ----------------------------------------------------------------------------------------------------
# 4. Cross-check with transformers' GotOcr2ImageProcessorPil (the HF port of the same tiling).
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (300, 1200), (800, 600), (448, 448), (10, 500)])
def test_matches_transformers_got_ocr2(width: int, height: int) -> None:
    from transformers import GotOcr2ImageProcessorPil
    from transformers.image_utils import PILImageResampling

    processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        size={"height": 448, "width": 448},
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_MEAN.tolist(),
        image_std=IMAGENET_STD.tolist(),
    )
    # RGB input only: for images with alpha, transformers composites onto white and upstream does not.
    img = noise_image(width, height, seed=11)
    result = processor(images=img, return_tensors=None)
    theirs = np.stack(result["pixel_values"]).astype(np.float32)  # (n, 3, 448, 448), normalised

    ours = tile_image(img)
    assert result["num_patches"] == [len(ours)]
    assert processor.get_number_of_image_patches(height, width, {"crop_to_patches": True}) == len(ours)

    ours_norm = ((ours.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
    assert theirs.shape == ours_norm.shape
    # Same PIL bicubic resize on the same uint8 data and the same float32 arithmetic: measured max |diff| is
    # exactly 0 on transformers 5.24.  Allow one float32 ulp-scale slack for other versions' arithmetic order.
    assert float(np.abs(theirs - ours_norm).max()) <= 1e-6
    # And the uint8 pixels they normalised are exactly ours.
    recovered = np.rint((theirs.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN) * 255.0)
    np.testing.assert_array_equal(recovered.astype(np.uint8), ours)


# ----------------------------------------------------------------------------------------------------
# 5. Output layout.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height"), [(1, 1), (448, 448), (1920, 1080), (100, 4000)])
def test_output_layout(width: int, height: int) -> None:
    out = tile_image(noise_image(width, height))
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    assert out.flags["WRITEABLE"]
    assert out.ndim == 4 and out.shape[1:] == (448, 448, 3)
    assert out.shape[0] == num_tiles_for(width, height)
