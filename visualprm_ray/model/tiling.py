"""Dynamic high-resolution tiling of images, exactly as VisualPRM / InternVL-2.5 preprocesses them.

VisualPRM-8B (an InternVL-2.5 model) does not look at an image at one fixed resolution.  The image is cut into
a grid of ``tile_size`` x ``tile_size`` tiles whose grid shape (cols, rows) best matches the image's aspect
ratio, using between ``min_tiles`` and ``max_tiles`` tiles, and a thumbnail of the whole image is appended
when there is more than one tile.  Every tile becomes a fixed number of image tokens, so the grid choice
decides both what the model sees and how long the prompt is.

The reward model was trained on tiles made this way, so the pixels must match upstream bit for bit: the same
grid choice (including upstream's tie-breaking, which depends on the order the candidate grids are visited),
the same ``convert("RGB")``, the same PIL bicubic resize, the same row-major tile order and thumbnail last.

What differs from upstream is only how the pixels are moved: upstream crops each tile with PIL and converts
each one to an array.  Here the resized image is read into numpy once and scattered into one preallocated
``(n, tile_size, tile_size, 3)`` uint8 array with a reshape/transpose, which gives identical pixels with
fewer copies.  This runs on CPU workers over millions of images; normalisation (``/255``, mean, std) is left
to the GPU, where it is cheap, and keeping uint8 here makes the arrays 4x smaller to ship between workers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = ["choose_grid", "num_tiles_for", "tile_image"]


def _check_limits(min_tiles: int, max_tiles: int, tile_size: int) -> None:
    # Upstream silently falls back to a 1x1 grid when no candidate exists (min > max); a misconfiguration
    # like that would change every prompt's token count without any error, so refuse it instead.
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles ({max_tiles}) must be >= min_tiles ({min_tiles})")


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with ``min_tiles <= cols * rows <= max_tiles``, in upstream's visiting order.

    The set is built with the very expression upstream uses and sorted the same way.  The order of grids with
    the same number of tiles is the set's iteration order, which for small int tuples is deterministic in
    CPython (tuple hashes of ints are not randomised).  That order matters: when two grids of equal area tie
    on aspect-ratio difference and the image is small, the one visited first wins.  Note that transformers'
    ``GotOcr2ImageProcessor`` visits the grids in a different (nested-loop) order, so it can pick a different
    grid than upstream in such ties; we follow upstream.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    # sorted() is stable, so equal-area grids keep the set's iteration order, as upstream.
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> tuple[int, int]:
    """Return the (cols, rows) tile grid upstream would pick for a ``width`` x ``height`` image.

    The grid whose cols/rows ratio is closest to width/height wins.  On an exact tie the later (larger or
    equal area) grid replaces the current one only while the image has more than half the pixels of that
    grid, so small images are not blown up into many mostly-interpolated tiles.
    """
    _check_limits(min_tiles, max_tiles, tile_size)
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        # Same float expressions as upstream so exact ties (==) are decided identically.
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles_for(
    width: int,
    height: int,
    *,
    max_tiles: int = 12,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    min_tiles: int = 1,
) -> int:
    """Number of tiles (thumbnail included) ``tile_image`` returns for this size, without touching pixels.

    Lets the pipeline budget image tokens from the header of an image alone.
    """
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n != 1 else n


def tile_image(
    image: Image.Image,
    max_tiles: int = 12,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    *,
    min_tiles: int = 1,
) -> np.ndarray:
    """Cut ``image`` into upstream's dynamic tiles: uint8 array of shape ``(n, tile_size, tile_size, 3)``.

    Tiles are in row-major order over the grid; the thumbnail (whole image resized to one tile), if any, is
    last.  No normalisation is applied.
    """
    # Upstream does Image.open(f).convert("RGB"): no EXIF transpose, alpha dropped (not composited on
    # white, unlike transformers' convert_to_rgb).  Skipping the no-op copy for RGB input is pixel-identical.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    n_grid = cols * rows
    with_thumb = use_thumbnail and n_grid != 1
    out = np.empty((n_grid + int(with_thumb), tile_size, tile_size, 3), dtype=np.uint8)

    # One resize of the whole image, then the tiles are views of it: (rows*ts, cols*ts, 3) viewed as
    # (rows, ts, cols, ts, 3) and transposed to (rows, cols, ts, ts, 3), whose row-major flattening is
    # upstream's tile index i = row * cols + col.  A single copy lands them in the output.
    resized = np.asarray(rgb.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC))
    grid = resized.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    # Reshaping the (contiguous) output slice is a view, so this is the only copy; reshaping `grid` instead
    # would make numpy materialise the transpose first.
    out[:n_grid].reshape(rows, cols, tile_size, tile_size, 3)[...] = grid
    if with_thumb:
        # Upstream resizes the original image, not the already-resized canvas: do the same.
        out[n_grid] = np.asarray(rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return out
