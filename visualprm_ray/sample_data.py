"""A small, realistic, deterministic sample of multimodal reasoning rollouts, and Parquet shards of it.

What: geometry problems with a figure drawn by Pillow (right triangle, circle, rectangle, parallel lines
cut by a transversal), a question with concrete numbers, the correct answer, and N candidate step-by-step
responses (steps separated by ``"\\n\\n"``), some correct and some with a wrong step and a wrong final
answer. :func:`write_shards` writes them as Parquet in every input representation the pipeline reads:
grouped or flat rows, and images as raw bytes, a Hugging Face ``{bytes, path}`` struct, absolute or
relative file paths, a list of images, no image at all, or a mix of rows with and without one.

Why: ``visualprm-ray demo`` needs input that looks like the real thing without a download, and the
integration tests need shards in each representation with known contents. Everything is a pure function
of its seed, so the same call gives the same bytes (figures, responses, Parquet files) every time.

Properties the tests and the pipeline rely on:

* figure sizes cycle through :data:`SIZES`, whose aspect ratios give different tile counts;
* responses have 1 to 8 steps, except that every 8th group (by index) holds one response of 14 to 18
  pieces, so that step merging (``max_steps``) is exercised whenever there are 8 groups or more;
* every group has at least one correct response and, with 2 candidates or more, at least one wrong one;
  a correct response ends with ``Final answer: \\boxed{<answer>}``, a wrong one boxes a different value;
* questions are self-contained (the numbers are in the text), so rows without an image still make sense.
"""

from __future__ import annotations

import io
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IMAGE_MODES",
    "KINDS",
    "SIZES",
    "draw_geometry_figure",
    "flat_rows",
    "image_arrow_type",
    "make_groups",
    "shard_schema",
    "write_shards",
]

KINDS: tuple[str, ...] = ("triangle", "circle", "rectangle", "parallel")
# Aspect ratios chosen so that InternVL tiling (max 12 tiles of 448) gives 13, 13, 3, 1, 4 and 13 tiles.
SIZES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (800, 600),
    (1024, 512),
    (448, 448),
    (300, 900),
    (1600, 1200),
)
IMAGE_MODES: tuple[str, ...] = ("bytes", "hf_struct", "path", "relative_path", "list", "none", "mixed")
LAYOUTS: tuple[str, ...] = ("grouped", "flat")

Layout = Literal["grouped", "flat"]
ImageMode = Literal["bytes", "hf_struct", "path", "relative_path", "list", "none", "mixed"]

_PYTHAGOREAN = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41), (6, 8, 10))
_LONG_EVERY = 8  # one group in this many (by index) carries a response of 14+ pieces
_IMAGE_SUBDIR = "figures"  # path modes write PNGs under <images_dir>/figures/


# ----------------------------------------------------------------------------------------------------
# Problems: one per (kind, seed); the figure and the question/answer/solutions derive from the same one.
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    kind: str
    question: str
    answer: str
    givens: list[str]
    core: list[str]  # the steps of a correct solution, without the final answer
    wrongs: list[tuple[list[str], str]]  # (steps with a mistake, the wrong answer they lead to)
    figure: dict[str, Any] = field(default_factory=dict)  # what the drawing needs


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _sqrt_str(n: int) -> str:
    r = math.isqrt(n)
    return str(r) if r * r == n else f"\\sqrt{{{n}}}"


def _problem(kind: str, seed: int) -> _Problem:
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; expected one of {', '.join(KINDS)}")
    rng = random.Random(f"visualprm-ray/sample/{kind}/{seed}")
    builder: dict[str, Callable[[random.Random], _Problem]] = {
        "triangle": _triangle_problem,
        "circle": _circle_problem,
        "rectangle": _rectangle_problem,
        "parallel": _parallel_problem,
    }
    problem = builder[kind](rng)
    # A wrong solution must really be wrong; drop any that happens to land on the answer.
    problem.wrongs = [(steps, ans) for steps, ans in problem.wrongs if ans != problem.answer]
    assert problem.wrongs, f"no wrong solution left for {kind} seed {seed}"
    return problem


def _triple(rng: random.Random) -> tuple[int, int, int]:
    a, b, c = rng.choice(_PYTHAGOREAN)
    k = rng.randint(1, 3) if c <= 10 else 1
    a, b, c = a * k, b * k, c * k
    return (b, a, c) if rng.random() < 0.5 else (a, b, c)


def _triangle_problem(rng: random.Random) -> _Problem:
    a, b, c = _triple(rng)  # AB = a (vertical leg), BC = b (horizontal leg), AC = c
    variant = rng.choice(("hypotenuse", "leg", "area"))
    start = "In the right triangle ABC, angle B = 90°"
    if variant == "hypotenuse":
        slip = a * a + b * b + rng.choice((-11, -10, -2, 2, 10, 11))
        return _Problem(
            kind="triangle",
            question=f"{start}, AB = {a} and BC = {b}. What is the length of AC?",
            answer=str(c),
            givens=[f"The legs are AB = {a} and BC = {b}.", "We need the hypotenuse AC."],
            core=[
                "Since angle B is a right angle, AC is the hypotenuse, so AC^2 = AB^2 + BC^2.",
                f"AB^2 = {a * a} and BC^2 = {b * b}.",
                f"AC^2 = {a * a} + {b * b} = {c * c}.",
                f"AC = \\sqrt{{{c * c}}} = {c}.",
            ],
            wrongs=[
                (
                    [
                        "Since angle B is a right angle, AC is the side opposite it.",
                        "The side opposite the right angle equals the sum of the other two sides, so AC = AB + BC.",
                        f"AC = {a} + {b} = {a + b}.",
                    ],
                    str(a + b),
                ),
                (
                    [
                        "By the Pythagorean theorem, AC^2 = AB^2 + BC^2.",
                        f"AB^2 = {a * a} and BC^2 = {b * b}.",
                        f"AC^2 = {a * a} + {b * b} = {slip}.",
                        f"AC = {_sqrt_str(slip)}.",
                    ],
                    _sqrt_str(slip),
                ),
            ],
            figure={"a": a, "b": b, "labels": (str(a), str(b), "?")},
        )
    if variant == "leg":
        return _Problem(
            kind="triangle",
            question=f"{start}, AB = {a} and the hypotenuse AC = {c}. What is the length of BC?",
            answer=str(b),
            givens=[f"AB = {a} is a leg and AC = {c} is the hypotenuse.", "We need the other leg BC."],
            core=[
                "By the Pythagorean theorem, AB^2 + BC^2 = AC^2.",
                f"So BC^2 = AC^2 - AB^2 = {c * c} - {a * a} = {b * b}.",
                f"BC = \\sqrt{{{b * b}}} = {b}.",
            ],
            wrongs=[
                (
                    [
                        "By the Pythagorean theorem, BC^2 = AB^2 + AC^2.",
                        f"BC^2 = {a * a} + {c * c} = {a * a + c * c}.",
                        f"BC = {_sqrt_str(a * a + c * c)}.",
                    ],
                    _sqrt_str(a * a + c * c),
                ),
                (
                    [
                        "In a right triangle the hypotenuse is the sum of the legs.",
                        f"So BC = AC - AB = {c} - {a} = {c - a}.",
                    ],
                    str(c - a),
                ),
            ],
            figure={"a": a, "b": b, "labels": (str(a), "?", str(c))},
        )
    half_hyp = a * c / 2
    return _Problem(
        kind="triangle",
        question=f"{start}, AB = {a} and BC = {b}. What is the area of triangle ABC?",
        answer=_num(a * b / 2),
        givens=[f"The legs are AB = {a} and BC = {b}.", "We need the area of the triangle."],
        core=[
            "The legs AB and BC are perpendicular, so they can serve as base and height.",
            f"Area = (1/2) * AB * BC = (1/2) * {a} * {b}.",
            f"Area = {a * b} / 2 = {_num(a * b / 2)}.",
        ],
        wrongs=[
            (
                [
                    "The legs AB and BC are perpendicular, so they are the base and the height.",
                    f"Area = AB * BC = {a} * {b} = {a * b}.",
                ],
                str(a * b),
            ),
            (
                [
                    f"By the Pythagorean theorem, AC = \\sqrt{{{a * a} + {b * b}}} = {c}.",
                    "Take AC as the base and AB as the height.",
                    f"Area = (1/2) * {c} * {a} = {_num(half_hyp)}.",
                ],
                _num(half_hyp),
            ),
        ],
        figure={"a": a, "b": b, "labels": (str(a), str(b), None)},
    )


def _circle_problem(rng: random.Random) -> _Problem:
    r = rng.randint(3, 15)
    angle = rng.uniform(-150.0, 150.0)
    figure = {"r": r, "angle": angle}
    start = f"A circle with center O has radius OA = {r}."
    if rng.random() < 0.5:
        return _Problem(
            kind="circle",
            question=f"{start} What is the area of the circle? Give the answer in terms of \\pi.",
            answer=f"{r * r}\\pi",
            givens=[f"The radius is OA = {r}.", "We need the area, in terms of \\pi."],
            core=[
                "The area of a circle is A = \\pi r^2.",
                f"Here r = OA = {r}.",
                f"A = \\pi * {r}^2 = {r * r}\\pi.",
            ],
            wrongs=[
                (
                    ["The area of a circle is A = 2\\pi r.", f"A = 2\\pi * {r} = {2 * r}\\pi."],
                    f"{2 * r}\\pi",
                ),
                (
                    [
                        f"The diameter is 2 * {r} = {2 * r}.",
                        "The area of a circle is \\pi times the square of the diameter.",
                        f"A = \\pi * {2 * r}^2 = {4 * r * r}\\pi.",
                    ],
                    f"{4 * r * r}\\pi",
                ),
            ],
            figure=figure,
        )
    return _Problem(
        kind="circle",
        question=f"{start} What is the circumference of the circle? Give the answer in terms of \\pi.",
        answer=f"{2 * r}\\pi",
        givens=[f"The radius is OA = {r}.", "We need the circumference, in terms of \\pi."],
        core=[
            "The circumference of a circle is C = 2\\pi r.",
            f"Here r = OA = {r}.",
            f"C = 2\\pi * {r} = {2 * r}\\pi.",
        ],
        wrongs=[
            (["The circumference of a circle is C = \\pi r.", f"C = \\pi * {r} = {r}\\pi."], f"{r}\\pi"),
            (
                ["The circumference of a circle is C = \\pi r^2.", f"C = \\pi * {r}^2 = {r * r}\\pi."],
                f"{r * r}\\pi",
            ),
        ],
        figure=figure,
    )


def _rectangle_problem(rng: random.Random) -> _Problem:
    variant = rng.choice(("area", "perimeter", "diagonal"))
    if variant == "diagonal":
        w, h, d = _triple(rng)
    else:
        w = rng.randint(3, 20)
        h = rng.choice([v for v in range(2, 16) if v != w])
        d = 0
    start = f"Rectangle ABCD has AB = {w} and BC = {h}."
    givens = [f"The sides are AB = {w} and BC = {h}."]
    figure = {"w": w, "h": h, "diagonal": variant == "diagonal"}
    slip = rng.choice((-10, -2, -1, 1, 2, 10))
    if variant == "area":
        return _Problem(
            kind="rectangle",
            question=f"{start} What is the area of the rectangle?",
            answer=str(w * h),
            givens=[*givens, "We need the area."],
            core=[
                "The area of a rectangle is length times width.",
                f"The length is AB = {w} and the width is BC = {h}.",
                f"Area = {w} * {h} = {w * h}.",
            ],
            wrongs=[
                (
                    ["The area is the sum of all four sides.", f"Area = 2 * ({w} + {h}) = {2 * (w + h)}."],
                    str(2 * (w + h)),
                ),
                (
                    ["The area of a rectangle is length times width.", f"Area = {w} * {h} = {w * h + slip}."],
                    str(w * h + slip),
                ),
            ],
            figure=figure,
        )
    if variant == "perimeter":
        return _Problem(
            kind="rectangle",
            question=f"{start} What is the perimeter of the rectangle?",
            answer=str(2 * (w + h)),
            givens=[*givens, "We need the perimeter."],
            core=[
                "Opposite sides of a rectangle are equal, so CD = AB and DA = BC.",
                "The perimeter is 2 * (AB + BC).",
                f"Perimeter = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)}.",
            ],
            wrongs=[
                (["The perimeter is AB + BC.", f"Perimeter = {w} + {h} = {w + h}."], str(w + h)),
                (
                    ["The perimeter is length times width.", f"Perimeter = {w} * {h} = {w * h}."],
                    str(w * h),
                ),
            ],
            figure=figure,
        )
    return _Problem(
        kind="rectangle",
        question=f"{start} What is the length of the diagonal AC?",
        answer=str(d),
        givens=[*givens, "We need the diagonal AC."],
        core=[
            "Angle B of the rectangle is a right angle, so triangle ABC is a right triangle.",
            "By the Pythagorean theorem, AC^2 = AB^2 + BC^2.",
            f"AC^2 = {w * w} + {h * h} = {d * d}.",
            f"AC = \\sqrt{{{d * d}}} = {d}.",
        ],
        wrongs=[
            (
                ["The diagonal goes along AB and then BC.", f"AC = AB + BC = {w} + {h} = {w + h}."],
                str(w + h),
            ),
            (
                [
                    "Triangle ABC is a right triangle with the right angle at B.",
                    "By the Pythagorean theorem, AC^2 = AB^2 - BC^2.",
                    f"AC^2 = {w * w} - {h * h} = {abs(w * w - h * h)}.",
                    f"AC = {_sqrt_str(abs(w * w - h * h))}.",
                ],
                _sqrt_str(abs(w * w - h * h)),
            ),
        ],
        figure=figure,
    )


# quadrant of an intersection -> the one it pairs with at the other intersection, per relation
_RELATIONS = {
    "corresponding": {"UR": "UR", "UL": "UL", "LL": "LL", "LR": "LR"},
    "alternate interior": {"LL": "UR", "LR": "UL"},
    "same-side interior": {"LL": "UL", "LR": "UR"},
}


def _parallel_problem(rng: random.Random) -> _Problem:
    a = rng.choice([v for v in range(35, 146, 5) if abs(v - 90) > 10])
    relation = rng.choice(tuple(_RELATIONS))
    q1 = rng.choice(sorted(_RELATIONS[relation]))
    q2 = _RELATIONS[relation][q1]
    theta = a if q1 in ("UR", "LL") else 180 - a  # angle of t with the parallel lines, measured at UR
    supplementary = relation == "same-side interior"
    answer = 180 - a if supplementary else a
    question = (
        "Lines l and m are parallel and are cut by the transversal t. "
        f"The angle marked {a}° and the angle x are {relation} angles. What is the measure of x, in degrees?"
    )
    rule = (
        "Same-side interior angles formed by a transversal of two parallel lines are supplementary."
        if supplementary
        else f"{relation.capitalize()} angles formed by a transversal of two parallel lines are equal."
    )
    core = [
        "Lines l and m are parallel, and t is a transversal.",
        rule,
        f"So x = 180° - {a}° = {180 - a}°." if supplementary else f"So x = {a}°.",
    ]
    wrong_rule = (
        "Same-side interior angles are equal."
        if supplementary
        else f"{relation.capitalize()} angles are supplementary."
    )
    wrong_value = a if supplementary else 180 - a
    wrongs = [
        (
            [
                "Lines l and m are parallel, and t is a transversal.",
                wrong_rule,
                f"So x = {a}°." if supplementary else f"So x = 180° - {a}° = {180 - a}°.",
            ],
            str(wrong_value),
        ),
        (
            ["The two angles together form a right angle.", f"So x = 90° - {a}° = {90 - a}°."]
            if a < 90
            else ["The marked angle is a right angle plus x.", f"So x = {a}° - 90° = {a - 90}°."],
            str(abs(90 - a)),
        ),
    ]
    return _Problem(
        kind="parallel",
        question=question,
        answer=str(answer),
        givens=[
            f"Lines l and m are parallel; the marked angle is {a}°.",
            f"x and the marked angle are {relation} angles.",
        ],
        core=core,
        wrongs=wrongs,
        figure={"a": a, "theta": theta, "q1": q1, "q2": q2},
    )


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any) -> None:
    """Draw ``text`` centred on ``xy`` (works for bitmap and FreeType fonts alike)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (right - left) / 2 - left
    y = xy[1] - (bottom - top) / 2 - top
    draw.text((x, y), text, fill="black", font=font)


def _unit(dx: float, dy: float) -> tuple[float, float]:
    n = math.hypot(dx, dy) or 1.0
    return dx / n, dy / n


def draw_geometry_figure(kind: str, seed: int, size: tuple[int, int]) -> Image.Image:
    """A diagram-like RGB figure: white background, black lines, labelled points and lengths.

    ``kind`` is one of :data:`KINDS`; ``seed`` picks the numbers (the same ones :func:`make_groups` puts in
    the question for that kind and seed); ``size`` is ``(width, height)`` in pixels.
    """
    problem = _problem(kind, seed)
    width, height = size
    if width < 64 or height < 64:
        raise ValueError(f"figure size must be at least 64x64, got {width}x{height}")
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    ctx = _Ctx(
        draw=draw,
        font=_font(max(12, short // 22)),
        off=max(12, short // 22),
        lw=max(2, short // 160),
        box=(short * 0.16, short * 0.16, width - short * 0.16, height - short * 0.16),
        short=short,
    )
    {
        "triangle": _draw_triangle,
        "circle": _draw_circle,
        "rectangle": _draw_rectangle,
        "parallel": _draw_parallel,
    }[kind](ctx, problem.figure)
    return image


@dataclass
class _Ctx:
    draw: ImageDraw.ImageDraw
    font: Any
    off: int  # label offset, about one text height
    lw: int  # line width
    box: tuple[float, float, float, float]  # where the figure goes; labels may use the margin
    short: int


def _draw_triangle(ctx: _Ctx, fig: dict[str, Any]) -> None:
    a, b = fig["a"], fig["b"]
    left, top, right, bottom = ctx.box
    scale = min((right - left) / b, (bottom - top) / a)
    bx = (left + right - b * scale) / 2
    by = (top + bottom + a * scale) / 2
    pa_, pb, pc = (bx, by - a * scale), (bx, by), (bx + b * scale, by)
    d, o = ctx.draw, ctx.off
    d.line([pa_, pb, pc, pa_], fill="black", width=ctx.lw, joint="curve")
    q = min(ctx.short * 0.06, a * scale / 4, b * scale / 4)
    d.line([(bx, by - q), (bx + q, by - q), (bx + q, by)], fill="black", width=max(1, ctx.lw // 2))
    _text(d, (pa_[0] - o, pa_[1] - o * 0.3), "A", ctx.font)
    _text(d, (pb[0] - o, pb[1] + o * 0.6), "B", ctx.font)
    _text(d, (pc[0] + o, pc[1] + o * 0.6), "C", ctx.font)
    ab, bc, ac = fig["labels"]
    _text(d, (bx - o * 1.8, by - a * scale / 2), ab, ctx.font)
    _text(d, (bx + b * scale / 2, by + o * 1.3), bc, ctx.font)
    if ac:
        mx, my = (pa_[0] + pc[0]) / 2, (pa_[1] + pc[1]) / 2
        ux, uy = _unit(mx - bx, my - by)
        _text(d, (mx + ux * o * 1.4, my + uy * o * 1.4), ac, ctx.font)


def _draw_circle(ctx: _Ctx, fig: dict[str, Any]) -> None:
    left, top, right, bottom = ctx.box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    rad = min(right - left, bottom - top) / 2
    d, o = ctx.draw, ctx.off
    d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline="black", width=ctx.lw)
    dot = max(2, ctx.lw)
    d.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill="black")
    ux, uy = math.cos(math.radians(fig["angle"])), -math.sin(math.radians(fig["angle"]))
    ax, ay = cx + ux * rad, cy + uy * rad
    d.line([(cx, cy), (ax, ay)], fill="black", width=ctx.lw)
    _text(d, (cx - ux * o, cy - uy * o), "O", ctx.font)
    _text(d, (cx + ux * (rad + o), cy + uy * (rad + o)), "A", ctx.font)
    # the length, beside the middle of the radius (perpendicular offset)
    _text(d, (cx + ux * rad / 2 - uy * o, cy + uy * rad / 2 + ux * o), str(fig["r"]), ctx.font)


def _draw_rectangle(ctx: _Ctx, fig: dict[str, Any]) -> None:
    w, h = float(fig["w"]), float(fig["h"])
    # not to scale beyond 3:1, so long thin rectangles stay readable
    w, h = max(w, h / 3), max(h, w / 3)
    left, top, right, bottom = ctx.box
    scale = min((right - left) / w, (bottom - top) / h)
    x0, y0 = (left + right - w * scale) / 2, (top + bottom - h * scale) / 2
    x1, y1 = x0 + w * scale, y0 + h * scale
    d, o = ctx.draw, ctx.off
    d.rectangle([x0, y0, x1, y1], outline="black", width=ctx.lw)
    for (x, y), name in zip(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), "ABCD", strict=True):
        _text(
            d,
            (x + (o * 0.8 if x == x1 else -o * 0.8), y + (o * 0.8 if y == y1 else -o * 0.8)),
            name,
            ctx.font,
        )
    _text(d, ((x0 + x1) / 2, y0 - o * 1.1), str(fig["w"]), ctx.font)
    _text(d, (x1 + o * 1.6, (y0 + y1) / 2), str(fig["h"]), ctx.font)
    if fig["diagonal"]:
        d.line([(x0, y0), (x1, y1)], fill="black", width=max(1, ctx.lw // 2))
        ux, uy = _unit(x1 - x0, y1 - y0)
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        _text(d, (mx + uy * o * 1.2, my - ux * o * 1.2), "?", ctx.font)


# quadrant -> its range of directions (degrees, counter-clockwise from the rightward ray), given theta
_QUADRANTS: dict[str, Callable[[float], tuple[float, float]]] = {
    "UR": lambda t: (0.0, t),
    "UL": lambda t: (t, 180.0),
    "LL": lambda t: (180.0, 180.0 + t),
    "LR": lambda t: (180.0 + t, 360.0),
}


def _draw_parallel(ctx: _Ctx, fig: dict[str, Any]) -> None:
    theta = float(fig["theta"])
    left, top, right, bottom = ctx.box
    d, o = ctx.draw, ctx.off
    cot = math.cos(math.radians(theta)) / math.sin(math.radians(theta))
    # vertical extent of the transversal, limited so its horizontal extent fits the box too
    span = min(bottom - top, (right - left) / max(abs(cot), 1e-6))
    gap, ext = span / 2, span / 4
    cx, cy = (left + right) / 2, (top + bottom) / 2
    y1, y2 = cy - gap / 2, cy + gap / 2
    p = (cx + gap * cot / 2, y1)  # t meets l
    q = (cx - gap * cot / 2, y2)  # t meets m
    for y, name in ((y1, "l"), (y2, "m")):
        d.line([(left, y), (right, y)], fill="black", width=ctx.lw)
        _text(d, (right + o * 0.8, y), name, ctx.font)
    t_top = (p[0] + ext * cot, y1 - ext)
    t_bottom = (q[0] - ext * cot, y2 + ext)
    d.line([t_top, t_bottom], fill="black", width=ctx.lw)
    ux, uy = _unit(t_top[0] - t_bottom[0], t_top[1] - t_bottom[1])
    _text(d, (t_top[0] + ux * o * 0.9 + o * 0.6, t_top[1] + uy * o * 0.9), "t", ctx.font)
    arc = max(8.0, min(ctx.short * 0.06, gap * 0.3))
    for (x, y), quadrant, label in ((p, fig["q1"], f"{fig['a']}°"), (q, fig["q2"], "x")):
        start, end = _QUADRANTS[quadrant](theta)
        d.arc(
            [x - arc, y - arc, x + arc, y + arc],
            start=-end,
            end=-start,
            fill="black",
            width=max(1, ctx.lw // 2),
        )
        mid = math.radians((start + end) / 2)
        dist = arc + o * (1.6 if len(label) > 1 else 0.9)
        _text(d, (x + math.cos(mid) * dist, y - math.sin(mid) * dist), label, ctx.font)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Responses and groups
# ----------------------------------------------------------------------------------------------------
_CHECKS = (
    "Let me double-check the numbers used so far.",
    "This agrees with the measurements marked in the figure.",
    "Checking the previous step: the arithmetic is right.",
    "Nothing here relies on anything the figure does not show.",
    "The units are consistent.",
)


def _response(problem: _Problem, steps: list[str], answer: str, style: str, rng: random.Random) -> str:
    final = f"Final answer: \\boxed{{{answer}}}"
    if style == "terse":  # 1 step
        pieces = [" ".join([*steps, final])]
    elif style == "brief":  # 2 steps
        pieces = [" ".join(steps), final]
    elif style == "normal":  # len(steps) + 1: 3 to 6
        pieces = [*steps, final]
    elif style == "verbose":  # len(steps) + 3: at most 8
        pieces = [
            "Let's read the figure and the question carefully.",
            " ".join(problem.givens),
            *steps,
            final,
        ]
    elif style == "long":  # 14 to 18 pieces, to exercise step merging
        target = rng.randint(14, 18)
        pieces = [
            "Let's read the figure and the question carefully.",
            "First, list what is given.",
            *problem.givens,
        ]
        pieces.append("Now solve it step by step.")
        for i, step in enumerate(steps):
            pieces += [step, _CHECKS[i % len(_CHECKS)]]
        fillers = iter(
            [
                "Re-reading the question to be sure the right quantity is asked for.",
                f"Restating the question: {problem.question}",
                "All steps are consistent with each other.",
                "So the result stands.",
            ]
            * 3
        )
        while len(pieces) < target - 1:
            pieces.append(next(fillers))
        pieces.append(final)
    else:
        raise ValueError(style)
    return "\n\n".join(pieces)


def _group_figure(index: int, seed: int) -> tuple[str, int, tuple[int, int]]:
    kind = KINDS[(index + seed) % len(KINDS)]
    size = SIZES[(index + seed) % len(SIZES)]
    return kind, seed * 1_000_003 + index, size


def make_groups(n_groups: int, candidates: int = 4, seed: int = 0) -> list[dict]:
    """``n_groups`` rollout groups: ``id``, ``question``, ``answer``, ``image`` (PNG bytes), ``responses``
    (``candidates`` strings), ``policy`` and ``subject``. A pure function of its arguments; group ``i`` does
    not depend on ``n_groups``, so a smaller call gives a prefix of a larger one."""
    if n_groups < 0:
        raise ValueError(f"n_groups must be >= 0, got {n_groups}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    groups = []
    for i in range(n_groups):
        kind, fig_seed, size = _group_figure(i, seed)
        problem = _problem(kind, fig_seed)
        rng = random.Random(f"visualprm-ray/sample/responses/{seed}/{i}")
        correct = [rng.random() < 0.55 for _ in range(candidates)]
        if not any(correct):
            correct[rng.randrange(candidates)] = True
        if candidates >= 2 and all(correct):
            correct[rng.randrange(candidates)] = False
        styles = rng.choices(("terse", "brief", "normal", "verbose"), weights=(1, 2, 4, 3), k=candidates)
        if (i + seed) % _LONG_EVERY == _LONG_EVERY - 1:
            styles[rng.randrange(candidates)] = "long"
        responses = []
        for ok, style in zip(correct, styles, strict=True):
            steps, answer = (problem.core, problem.answer) if ok else rng.choice(problem.wrongs)
            responses.append(_response(problem, steps, answer, style, rng))
        groups.append(
            {
                "id": f"geo-{i:05d}",
                "question": problem.question,
                "answer": problem.answer,
                "image": _png(draw_geometry_figure(kind, fig_seed, size)),
                "responses": responses,
                "policy": rng.choice(("policy-a", "policy-b")),
                "subject": "geometry",
            }
        )
    return groups


# ----------------------------------------------------------------------------------------------------
# Parquet shards
# ----------------------------------------------------------------------------------------------------
def image_arrow_type(image_mode: str) -> pa.DataType:
    """The Arrow type of the ``image`` column for an ``image_mode`` of :func:`write_shards`."""
    types = {
        "bytes": pa.binary(),
        "hf_struct": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        "path": pa.string(),
        "relative_path": pa.string(),
        "list": pa.list_(pa.binary()),
        "none": pa.binary(),
        "mixed": pa.binary(),
    }
    if image_mode not in types:
        raise ValueError(f"unknown image_mode {image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")
    return types[image_mode]


def shard_schema(layout: str = "grouped", image_mode: str = "bytes") -> pa.Schema:
    """The exact Arrow schema :func:`write_shards` writes for a layout and image mode."""
    image = pa.field("image", image_arrow_type(image_mode))
    head = [pa.field("id", pa.string()), pa.field("question", pa.string()), image]
    tail = [
        pa.field("answer", pa.string()),
        pa.field("policy", pa.string()),
        pa.field("subject", pa.string()),
    ]
    if layout == "grouped":
        return pa.schema([*head, pa.field("responses", pa.list_(pa.string())), *tail])
    if layout == "flat":
        middle = [pa.field("response", pa.string()), pa.field("candidate_index", pa.int32())]
        return pa.schema([*head, *middle, *tail])
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def flat_rows(groups: Sequence[dict]) -> list[dict]:
    """One row per candidate: the group's fields, ``response`` and its 0-based ``candidate_index``.

    The ``image`` value is passed through as it is (bytes, a path, a list, None...)."""
    rows = []
    for group in groups:
        for k, response in enumerate(group["responses"]):
            rows.append(
                {
                    "id": group["id"],
                    "question": group["question"],
                    "image": group["image"],
                    "response": response,
                    "candidate_index": k,
                    "answer": group["answer"],
                    "policy": group["policy"],
                    "subject": group["subject"],
                }
            )
    return rows


def _second_figure(group_id: str, first: bytes) -> bytes:
    """A different figure for the same row (list mode), derived from the id only."""
    crc = zlib.crc32(group_id.encode())
    for bump in range(8):
        png = _png(
            draw_geometry_figure(
                KINDS[(crc + bump) % len(KINDS)], crc + bump, SIZES[(crc // 7 + bump) % len(SIZES)]
            )
        )
        if png != first:
            return png
    raise AssertionError("could not draw a second, different figure")  # pragma: no cover


def _row_image(group: dict, index: int, image_mode: str, images_dir: Path | None) -> tuple[Any, str]:
    """The image value for the row of group number ``index`` (in the whole list), and its question."""
    png, question = group["image"], group["question"]
    if image_mode == "bytes":
        return png, question
    if image_mode == "hf_struct":
        return {"bytes": png, "path": f"{group['id']}.png" if index % 2 == 0 else None}, question
    if image_mode in ("path", "relative_path"):
        assert images_dir is not None
        relative = f"{_IMAGE_SUBDIR}/{group['id']}.png"
        target = images_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        return (str(target.resolve()) if image_mode == "path" else relative), question
    if image_mode == "list":
        if index % 2 == 0:
            return [png], question
        prefix = (
            "There are two figures: the first one illustrates this problem, the second one another problem. "
        )
        return [png, _second_figure(group["id"], png)], prefix + question
    if image_mode == "none":
        return None, question
    if image_mode == "mixed":
        return (None if index % 3 == 1 else png), question
    raise ValueError(f"unknown image_mode {image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")


def write_shards(
    directory: str | Path,
    groups: list[dict],
    n_shards: int,
    *,
    layout: Layout = "grouped",
    image_mode: ImageMode = "bytes",
    images_dir: str | Path | None = None,
) -> list[Path]:
    """Write ``groups`` as ``n_shards`` Parquet files ``part-00000.parquet``... in ``directory``.

    Groups are split in order into shards whose sizes differ by at most one (the first shards get the
    extra groups; with more shards than groups the last ones are empty but still carry the schema). In the
    flat layout a group's candidates always stay in one shard. The schema is :func:`shard_schema`.

    ``image_mode`` picks the ``image`` column: ``bytes`` (binary); ``hf_struct`` (``struct<bytes, path>``,
    ``path`` a file name on even rows and null on odd ones); ``path`` / ``relative_path`` (strings: PNGs
    are written to ``<images_dir>/figures/<id>.png`` and the column holds the absolute path, or the path
    relative to ``images_dir``, the job's image root); ``list`` (``list<binary>``: one image on even rows,
    two on odd rows, whose question then mentions the two figures); ``none`` (binary, all null); ``mixed``
    (binary, null on every third row starting with the second). Row parity counts groups across shards.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    schema = shard_schema(layout, image_mode)
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    root: Path | None = None
    if image_mode in ("path", "relative_path"):
        if images_dir is None:
            raise ValueError(f"image_mode={image_mode!r} needs images_dir")
        root = Path(images_dir)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for index, group in enumerate(groups):
        image, question = _row_image(group, index, image_mode, root)
        rows.append({**group, "image": image, "question": question, "responses": list(group["responses"])})

    per_shard, extra = divmod(len(rows), n_shards)
    paths, start = [], 0
    for k in range(n_shards):
        stop = start + per_shard + (1 if k < extra else 0)
        chunk = rows[start:stop]
        start = stop
        records = flat_rows(chunk) if layout == "flat" else chunk
        columns = {name: [record[name] for record in records] for name in schema.names}
        table = pa.Table.from_pydict(columns, schema=schema)
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths
