"""Prefix sharing on CPU: one group call vs one call per candidate, tiny checkpoint; and work accounting.

Part 1 times `VisualPRM.score` on a whole group against one call per candidate. Then, on a wider
language model where the work follows the token count, candidates of mixed lengths in right-padded
chunks (prefix_cache) vs chunks packed without padding (shared_prefix). Part 2 counts the
exact work per group (language-model tokens and vision tiles computed) by this project's scorer
vs upstream's one-forward-per-candidate loop, over a grid of tiles x candidates x response length,
from the prepared token sequences themselves. Prints tables and writes JSON. The tiny checkpoint keeps the real image geometry (448-px tiles,
256 image tokens each), so the image-token prefix is as long as the real model's; only the layer
sizes are tiny. Usage: python benchmarks/scorer_cpu.py [--candidates 8] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

SIZES = {"1920x1080": (1920, 1080), "1600x1200": (1600, 1200)}


def _image(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.line(
            [(i * width // 12, 0), (width - i * width // 12, height)], fill=(40 * (i % 6), 0, 0), width=5
        )
    return img


def _responses(n: int) -> list[str]:
    steps = [
        f"Step {i}: the side AB is {i + 3} cm, so the area grows by {2 * i + 1} units." for i in range(6)
    ]
    return ["\n\n".join([*steps[: 3 + k % 3], f"Final answer: \\boxed{{{k * 7}}}"]) for k in range(n)]


# Padded vs packed: wide enough that the layers' work, not per-call overhead, sets the time.
WIDE_LLM = {
    "vocab_size": 925,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
WIDE_GROUPS = 4
WIDE_LENGTHS = (100, 800)


def padding_by_mode(*, tokenizer, timed) -> list[dict]:
    """The same text-only groups of mixed-length candidates through both candidate layouts."""
    import random

    from gpu_scorer import build_checkpoint

    from visualprm_ray.model.prm import VisualPRM
    from visualprm_ray.model.scoring import make_scorer
    from visualprm_ray.model.tiny_checkpoint import _WORDS, TINY_VISION, upstream_config

    checkpoint = build_checkpoint(
        upstream_config(llm=WIDE_LLM, vision=TINY_VISION), tokenizer, dtype="float32", device="cpu"
    )
    prm = VisualPRM(checkpoint)
    rng = random.Random(0)
    groups = []
    for g in range(WIDE_GROUPS):
        responses = [
            _response_of(rng.randint(*WIDE_LENGTHS), rng.randrange(100), tokenizer) for _ in range(8)
        ]
        question = f"Question {g}: " + " ".join(rng.choice(_WORDS) for _ in range(100))
        groups.append(prm.prepare(question, responses, None))
    real = sum(len(s) for g in groups for s in g.suffixes)
    padded = sum(g.num_candidates * max(len(s) for s in g.suffixes) for g in groups)
    out = []
    for mode in ("prefix_cache", "shared_prefix"):
        scorer = make_scorer(checkpoint, mode=mode)
        scorer.score(groups[:1])  # warm-up
        out.append(
            {
                "mode": mode,
                "suffix_tokens": real if mode == "shared_prefix" else padded,
                "seconds": round(timed(lambda s=scorer: s.score(groups)), 3),
            }
        )
    return out


WORK_TILES = {
    "text-only": None,
    "448x448 (1 tile)": (448, 448),
    "1024x512 (3 tiles)": (1024, 512),
    "1600x1200 (13 tiles)": (1600, 1200),
}
WORK_CANDIDATES = (1, 4, 8, 16)
WORK_LENGTHS = (100, 400)


def _response_of(tokens: int, seed: int, tokenizer) -> str:
    words = ["the", "area", "side", "angle", "is", "so", "we", "have", "+", "=", "3", "4", "5"]
    steps, total, i = [], 0, seed
    while total < tokens:
        step = " ".join(words[(i + j * 7) % len(words)] for j in range(25))
        total += len(tokenizer.encode(step, add_bos=False)) + 12
        steps.append(step)
        i += 1
    return "\n\n".join(steps)


def work_accounting(prm) -> list[dict]:
    """LM tokens and vision tiles per group: ours (prefix once, each image once) vs upstream's loop."""
    rows = []
    for name, size in WORK_TILES.items():
        image = _image(*size) if size else None
        for length in WORK_LENGTHS:
            responses = [_response_of(length, seed, prm.tokenizer) for seed in range(max(WORK_CANDIDATES))]
            for n in WORK_CANDIDATES:
                group = prm.prepare("In the figure, find the area of triangle ABC.", responses[:n], image)
                tiles = len(group.tiles)
                ours = len(group.prefix) + sum(len(s) for s in group.suffixes)
                upstream = sum(group.sequence_length(k) for k in range(n))
                rows.append(
                    {
                        "image": name,
                        "response_tokens": length,
                        "candidates": n,
                        "lm_tokens_ours": ours,
                        "lm_tokens_upstream": upstream,
                        "tiles_ours": tiles,
                        "tiles_upstream": tiles * n,
                        "lm_ratio": round(upstream / ours, 2),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()

    import torch

    from visualprm_ray.model.prm import VisualPRM
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        prm = VisualPRM.from_pretrained(write_tiny_checkpoint(tmp), device="cpu", dtype="float32")
    responses = _responses(args.candidates)
    question = "In the figure, what is the area of triangle ABC?"

    def timed(fn) -> float:
        """Median wall time of ``args.repeats`` calls."""
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    rows = []
    for name, (w, h) in SIZES.items():
        image = _image(w, h)
        tiles = len(prm.tile(image)[0])
        prm.score(question, responses[:2], image)  # warm-up
        group = timed(lambda image=image: prm.score(question, responses, image))
        single = timed(lambda image=image: [prm.score(question, [r], image) for r in responses])
        rows.append(
            {
                "image": name,
                "tiles": tiles,
                "candidates": len(responses),
                "group_call_s": round(group, 3),
                "one_by_one_s": round(single, 3),
                "speedup": round(single / group, 2),
            }
        )
    modes = padding_by_mode(tokenizer=prm.tokenizer, timed=timed)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"prefix sharing on CPU (tiny checkpoint, float32), {machine}, threads={torch.get_num_threads()}")
    print(f"{'image':<10} {'tiles':>5} {'cands':>5} {'group s':>8} {'1-by-1 s':>9} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['image']:<10} {r['tiles']:>5} {r['candidates']:>5} {r['group_call_s']:>8.3f} "
            f"{r['one_by_one_s']:>9.3f} {r['speedup']:>7.2f}x"
        )
    print(
        f"\npadded vs packed candidate chunks: {WIDE_GROUPS} text-only groups x 8 candidates of "
        f"{WIDE_LENGTHS[0]}-{WIDE_LENGTHS[1]} tokens, a {WIDE_LLM['hidden_size']}-wide "
        f"{WIDE_LLM['num_hidden_layers']}-layer language model (float32)"
    )
    print(f"{'mode':<14} {'suffix tok':>10} {'seconds':>8} {'speedup':>8}")
    for r in modes:
        speedup = modes[0]["seconds"] / r["seconds"]
        print(f"{r['mode']:<14} {r['suffix_tokens']:>10} {r['seconds']:>8.2f} {speedup:>7.2f}x")
    work = work_accounting(prm)
    print("\nwork per group: language-model tokens and vision tiles, ours vs upstream's loop")
    print(
        f"{'image':<22} {'resp tok':>8} {'cands':>5} {'LM ours':>8} {'LM upstream':>11} {'x':>5} {'tiles':>5} {'tiles up':>8}"
    )
    for w in work:
        print(
            f"{w['image']:<22} {w['response_tokens']:>8} {w['candidates']:>5} {w['lm_tokens_ours']:>8} "
            f"{w['lm_tokens_upstream']:>11} {w['lm_ratio']:>5} {w['tiles_ours']:>5} {w['tiles_upstream']:>8}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "rows": rows, "modes": modes, "work": work}, indent=2)
        )


if __name__ == "__main__":
    main()
