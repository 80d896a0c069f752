"""CPU image path: ours (decode + uint8 tiles) vs upstream-style (decode + PIL crops + per-tile normalise).

What is compared, per image and single-threaded (images/second per core), both starting from the encoded
bytes so decoding is included:

* ours: ``visualprm_ray.model.images.open_image_bytes`` then ``visualprm_ray.model.tiling.tile_image``, which resizes
  once and scatters the tiles into one ``(n, 448, 448, 3)`` uint8 array.  That is all the CPU workers do:
  normalisation (``/255``, ImageNet mean/std) is deferred to the GPU, where it is a cheap elementwise op,
  and shipping uint8 instead of float32 makes the arrays 4x smaller to move between workers.  Not doing
  that float work on the CPU is the point, so the difference measured includes it on purpose.
* upstream-style: what VisualPRM / InternVL-2.5's release code does in ``load_image``:
  ``Image.open(...).convert("RGB")``, ``dynamic_preprocess`` (one bicubic resize, ``resized.crop(box)`` per
  tile, plus the thumbnail resized from the original), then per tile its transform
  (``Resize((448, 448), BICUBIC)``, ``ToTensor``, ``Normalize``) and ``torch.stack``.  torchvision is not
  installed, so the transform is written with PIL and torch, doing the same work as torchvision's: the
  Resize of a tile already 448x448 is Pillow's copy; ToTensor copies the tile into an array
  (``np.array(..., copy=True)``), makes the CHW uint8 tensor contiguous, then converts and divides;
  Normalize (not in place) clones, subtracts and divides.
* lean upstream-style, printed beside it (the baseline of the measurements before 2026-12-01): the same
  crops without the copies that do not change a pixel (the tile Resize, ToTensor's array copy and
  contiguous CHW, Normalize's clone), converting the permuted uint8 view to float and normalising out
  of place.  It is not faster than upstream's own sequence: on a 2-core AMD EPYC it was slower.

Both paths use ``visualprm_ray.model.tiling.choose_grid`` for the grid, so they do the same tiles and only the
pixel path differs.  Before timing, each image is run through both paths once and the uint8 tiles,
normalised the same way, must equal the upstream-style tensor within 1e-6, so the benchmark cannot
compare different work.  Images are synthetic diagram-like drawings with some noise (so encoded sizes are
realistic), generated deterministically in memory.  Usage:
python benchmarks/tiling_cpu.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

# (name, format, width, height, save options)
IMAGES = [
    ("jpeg_1920x1080", "JPEG", 1920, 1080, {"quality": 90}),
    ("jpeg_1280x960", "JPEG", 1280, 960, {"quality": 90}),
    ("png_800x600", "PNG", 800, 600, {}),
    ("png_1600x1200", "PNG", 1600, 1200, {}),
    ("jpeg_640x480", "JPEG", 640, 480, {"quality": 90}),
    ("png_448x448", "PNG", 448, 448, {}),
]
MAX_TILES = 12
TILE_SIZE = 448
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TOLERANCE = 1e-6


def make_image_bytes(fmt: str, width: int, height: int, options: dict, seed: int) -> bytes:
    """A diagram-like drawing (boxes, arrows, a plot, text) with noise, encoded as ``fmt``."""
    import io
    import itertools
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (250, 250, 247))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, height // 40))
    # Grid lines, as on graph paper or a chart background.
    step = max(16, width // 24)
    for x in range(0, width, step):
        draw.line([(x, 0), (x, height)], fill=(225, 230, 235), width=1)
    for y in range(0, height, step):
        draw.line([(0, y), (width, y)], fill=(225, 230, 235), width=1)
    # Labelled boxes joined by arrows.
    centres = []
    for i in range(8):
        w, h = rng.randint(width // 10, width // 5), rng.randint(height // 12, height // 6)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        colour = tuple(rng.randint(120, 240) for _ in range(3))
        draw.rounded_rectangle([x, y, x + w, y + h], radius=8, fill=colour, outline=(40, 40, 40), width=2)
        draw.text((x + 6, y + 6), f"step {i + 1}: x={rng.randint(0, 99)}", fill=(10, 10, 10), font=font)
        centres.append((x + w // 2, y + h // 2))
    for (x0, y0), (x1, y1) in itertools.pairwise(centres):
        draw.line([(x0, y0), (x1, y1)], fill=(30, 60, 160), width=3)
        draw.ellipse([x1 - 5, y1 - 5, x1 + 5, y1 + 5], fill=(30, 60, 160))
    # A polyline plot, circles and a formula-like text line.
    points = [(int(width * k / 40), int(height * (0.7 - 0.25 * rng.random()))) for k in range(41)]
    draw.line(points, fill=(200, 40, 40), width=2)
    for _ in range(6):
        r = rng.randint(10, max(11, min(width, height) // 10))
        cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(20, 120, 60), width=3)
    draw.text(
        (10, height - height // 20), "f(x) = 3x^2 - 2x + 1,  area = 1/2 * b * h", fill=(0, 0, 0), font=font
    )

    pixels = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, pixels.shape)
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, **options)
    return buf.getvalue()


def _cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, where ``platform.processor()`` is empty (as on most Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per image and path (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import io
    import warnings

    import numpy as np
    import PIL
    import torch
    from PIL import Image

    from visualprm_ray.model.images import open_image_bytes
    from visualprm_ray.model.tiling import choose_grid, tile_image

    # The tiles' arrays are read-only views of PIL's buffer; they are only read, so the warning is noise.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(1)  # per-core numbers; PIL's decode/resize are single-threaded anyway
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)

    def ours(data: bytes) -> np.ndarray:
        return tile_image(open_image_bytes(data), max_tiles=MAX_TILES, tile_size=TILE_SIZE)

    def upstream_tiles(data: bytes) -> list[Image.Image]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        width, height = image.size
        cols, rows = choose_grid(width, height, max_tiles=MAX_TILES, tile_size=TILE_SIZE)
        resized = image.resize((TILE_SIZE * cols, TILE_SIZE * rows), Image.Resampling.BICUBIC)
        tiles = []
        for i in range(cols * rows):
            x, y = (i % cols) * TILE_SIZE, (i // cols) * TILE_SIZE
            tiles.append(resized.crop((x, y, x + TILE_SIZE, y + TILE_SIZE)))
        if len(tiles) != 1:
            tiles.append(image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC))
        return tiles

    def upstream_style(data: bytes) -> torch.Tensor:
        tensors = []
        for tile in upstream_tiles(data):
            tile = tile.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)  # Resize: a copy here
            x = torch.from_numpy(np.array(tile, np.uint8, copy=True))  # ToTensor ...
            x = x.view(TILE_SIZE, TILE_SIZE, 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
            tensors.append(x.clone().sub_(mean).div_(std))  # Normalize, not in place
        return torch.stack(tensors)

    def lean_upstream_style(data: bytes) -> torch.Tensor:
        tensors = []
        for tile in upstream_tiles(data):
            x = torch.from_numpy(np.asarray(tile)).permute(2, 0, 1).float().div(255)
            tensors.append((x - mean) / std)
        return torch.stack(tensors)

    def normalise_uint8(tiles: np.ndarray) -> torch.Tensor:
        # What the GPU side does with our tiles, here on CPU only to check equality.
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255)
        return (x - mean) / std

    results = []
    total_ours = total_upstream = total_lean = 0.0
    for seed, (name, fmt, width, height, options) in enumerate(IMAGES):
        data = make_image_bytes(fmt, width, height, options, seed)
        # Check (and warm up) once: same tiles from both paths.
        expected = upstream_style(data)
        got = normalise_uint8(ours(data))
        max_diff = 0.0
        for other in (got, lean_upstream_style(data)):
            if other.shape != expected.shape:
                raise SystemExit(f"{name}: shapes differ, {tuple(other.shape)} vs {tuple(expected.shape)}")
            max_diff = max(max_diff, (other - expected).abs().max().item())
        if max_diff > TOLERANCE:
            raise SystemExit(f"{name}: tiles differ, max abs difference {max_diff:g} > {TOLERANCE:g}")

        paths = {"ours": ours, "upstream": upstream_style, "lean": lean_upstream_style}
        spent = dict.fromkeys(paths, 0.0)
        for rep in range(args.repeats):
            # Rotate which path goes first so none always runs on a warmer cache.
            order = list(paths)[rep % 3 :] + list(paths)[: rep % 3]
            for which in order:
                start = time.perf_counter()
                paths[which](data)
                spent[which] += time.perf_counter() - start
        t_ours, t_upstream, t_lean = spent["ours"], spent["upstream"], spent["lean"]
        total_ours += t_ours
        total_upstream += t_upstream
        total_lean += t_lean
        results.append(
            {
                "image": name,
                "format": fmt,
                "width": width,
                "height": height,
                "encoded_bytes": len(data),
                "tiles": int(expected.shape[0]),
                "max_abs_diff": max_diff,
                "ours_img_per_s": args.repeats / t_ours,
                "upstream_img_per_s": args.repeats / t_upstream,
                "lean_upstream_img_per_s": args.repeats / t_lean,
                "speedup": t_upstream / t_ours,
                "speedup_vs_lean": t_lean / t_ours,
            }
        )

    n_images = args.repeats * len(IMAGES)
    overall = {
        "images": n_images,
        "ours_s": total_ours,
        "upstream_s": total_upstream,
        "ours_img_per_s": n_images / total_ours,
        "upstream_img_per_s": n_images / total_upstream,
        "lean_upstream_s": total_lean,
        "lean_upstream_img_per_s": n_images / total_lean,
        "speedup": total_upstream / total_ours,
        "speedup_vs_lean": total_lean / total_ours,
    }
    machine = {
        "processor": platform.processor() or _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }

    print(
        f"Image path per core (1 thread), decode included, {args.repeats} runs per image; "
        f"{machine['machine']}, {machine['processor'] or 'unknown CPU'}, {machine['cpu_count']} cores"
    )
    print(
        f"{'image':<16} {'KiB':>6} {'tiles':>5} {'ours img/s':>11} {'upstream img/s':>15} {'speedup':>8} "
        f"{'lean img/s':>11} {'vs lean':>8}"
    )
    for r in results:
        print(
            f"{r['image']:<16} {r['encoded_bytes'] / 1024:>6.0f} {r['tiles']:>5} {r['ours_img_per_s']:>11.1f} "
            f"{r['upstream_img_per_s']:>15.1f} {r['speedup']:>7.2f}x {r['lean_upstream_img_per_s']:>11.1f} "
            f"{r['speedup_vs_lean']:>7.2f}x"
        )
    print(
        f"{'overall':<16} {'':>6} {'':>5} {overall['ours_img_per_s']:>11.1f} "
        f"{overall['upstream_img_per_s']:>15.1f} {overall['speedup']:>7.2f}x "
        f"{overall['lean_upstream_img_per_s']:>11.1f} {overall['speedup_vs_lean']:>7.2f}x   "
        f"({n_images} images: ours {total_ours:.2f}s, upstream-style {total_upstream:.2f}s, lean {total_lean:.2f}s)"
    )
    print(f"tiles checked equal (max abs diff <= {TOLERANCE:g}) for every image before timing")

    if args.json:
        payload = {
            "benchmark": "tiling_cpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "settings": {
                "repeats": args.repeats,
                "threads": 1,
                "max_tiles": MAX_TILES,
                "tile_size": TILE_SIZE,
                "tolerance": TOLERANCE,
            },
            "images": results,
            "overall": overall,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
