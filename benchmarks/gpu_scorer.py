"""The 8B scorer on a GPU: upstream-style loop vs the project's scorer, same inputs, same model.

Builds VisualPRM-8B's architecture (InternViT-300M + a Llama-shaped 7.7B language model with the
real config sizes) with random bf16 weights directly on the device (nothing is downloaded), makes
groups of candidates for 13-tile images, then measures:
  - the upstream-style loop: one full forward per candidate, image re-encoded every time;
  - the project's scorer (vision once, prefix once) per variant: a layout and the fast paths of
    KernelOptions (see VARIANT_HELP), every variant on the same inputs, the default first and last;
  - the max difference between the two paths' step scores, and a float32 parity check on a
    real-width, reduced-depth model;
  - rollouts/s, MFU from the FLOP count against a measured bf16 matmul peak, and peak memory.
`--tiny` runs the same code on the CPU with the tiny test sizes, so the script cannot rot.
Usage: python benchmarks/gpu_scorer.py [--tiny] [--groups 16] [--variants LIST] [--profile [VARIANT]] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from visualprm_ray.model.tiny_checkpoint import VISUALPRM_8B_LLM as REAL_LLM
from visualprm_ray.model.tiny_checkpoint import VISUALPRM_8B_VISION as REAL_VISION


def build_checkpoint(config: dict, tokenizer, *, dtype: str, device: str):
    import torch

    from visualprm_ray.model.checkpoint import (
        LoadedCheckpoint,
        build_model,
        native_config_from_upstream,
        read_info,
        resolve_dtype,
    )
    from visualprm_ray.model.prompt import IMG_CONTEXT

    native = native_config_from_upstream(config, image_token_id=tokenizer.token_to_id(IMG_CONTEXT))
    torch.manual_seed(0)
    model = build_model(native, dtype=resolve_dtype(dtype), device=device, attn_implementation="sdpa")
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, info=read_info(config, tokenizer))


def make_groups(
    prm, tokenizer, *, groups: int, candidates: int, response_tokens: int, spread: float = 0.0, seed: int = 0
):
    """Groups of one 13-tile image, a question and candidates of about ``response_tokens`` tokens
    each; with ``spread`` s, each candidate's length is drawn from [(1 - s), (1 + s)] x that."""
    from PIL import Image, ImageDraw

    from visualprm_ray.model.tiny_checkpoint import _WORDS

    rng = random.Random(seed)
    out = []
    for g in range(groups):
        img = Image.new("RGB", (1600, 1200), "white")  # 4:3 -> 12 tiles + thumbnail = 13
        draw = ImageDraw.Draw(img)
        for _ in range(20):
            draw.line([(rng.randrange(1600), rng.randrange(1200)) for _ in range(2)], fill=(0, 0, 0), width=4)
        responses = []
        for _ in range(candidates):
            steps, tokens = [], 0
            target = response_tokens * (1 + spread * (2 * rng.random() - 1)) if spread else response_tokens
            while tokens < target:
                step = f"Step {len(steps) + 1}: " + " ".join(rng.choice(_WORDS) for _ in range(30))
                tokens += len(tokenizer.encode(step, add_bos=False)) + 12  # + the turn's markers
                steps.append(step)
            responses.append(steps)
        question = f"Question {g}: in the figure, find the area of triangle ABC. " + " ".join(
            rng.choice(_WORDS) for _ in range(20)
        )
        out.append((question, responses, img))
    return out


def flops_per_token(model) -> tuple[float, float]:
    """2 x parameters for the language model (without embeddings and head) and per vision token."""
    lm = model.model.language_model
    lm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    proj_params = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return 2.0 * lm_params, 2.0 * vision_params + 2.0 * proj_params / 4  # projector runs on 1/4 of tokens


def work_of(prepared, model, cfg) -> dict:
    """FLOPs of our path and of upstream's loop for prepared groups (matmuls + attention)."""
    lm_tok, vis_tok = flops_per_token(model)
    text = model.config.text_config
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    patches = (448 // 14) ** 2 + 1
    vcfg = model.config.vision_config
    vis_attn_per_tile = 4.0 * patches * patches * vcfg.hidden_size * vcfg.num_hidden_layers
    ours = upstream = 0.0
    tokens_ours = tokens_up = tiles_total = 0
    for group in prepared:
        tiles = len(group.tiles)
        vision = tiles * (patches * vis_tok + vis_attn_per_tile)
        p = len(group.prefix)
        suffixes = [len(s) for s in group.suffixes]
        # causal attention: 2 matmuls x 2 FLOPs x L^2/2 x hidden per layer
        ours += vision + (p + sum(suffixes)) * lm_tok
        ours += 2.0 * layers * hidden * (p * p + sum(s * (2 * p + s) for s in suffixes))
        for s in suffixes:
            length = p + s
            upstream += vision + length * lm_tok + 2.0 * layers * hidden * length * length
            upstream += 2.0 * length * hidden * vocab  # the full-vocabulary head upstream computes
            tokens_up += length
        tokens_ours += p + sum(suffixes)
        tiles_total += tiles
    return {
        "flops_ours": ours,
        "flops_upstream": upstream,
        "lm_tokens_ours": tokens_ours,
        "lm_tokens_upstream": tokens_up,
        "tiles_ours": tiles_total,
        "tiles_upstream": tiles_total * len(prepared[0].suffixes),
    }


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - start)


# A variant is "default" (what make_scorer picks on this device) or a layout and options joined by
# "+", e.g. "shared_prefix+varlen+merge": each short name is one KernelOptions value, "cudnn" lets
# SDPA use cuDNN (off by default), "all" every option at once.
SHORT_OPTIONS = {
    "varlen": ("attention", "varlen"),
    "merge": ("merge", "compiled"),
    "leaves": ("leaf_ops", "compiled"),
    "rope": ("rotary", "static"),
    "async": ("host_syncs", "avoid"),
}
VARIANT_HELP = (
    "default | MODE[+"
    + "|+".join([*SHORT_OPTIONS, "all", "cudnn"])
    + "] (MODE: packed, prefix_cache, shared_prefix)"
)
# The variants a GPU session compares (benchmarks/gpu_session.py): the default, then each fast
# path added one at a time on shared_prefix, the model-wide ones on prefix_cache, and the default
# again, whose two timings bound the drift over the run.
SESSION_VARIANTS = ",".join(
    [
        "default",
        "shared_prefix",
        "shared_prefix+varlen",
        "shared_prefix+varlen+merge",
        "shared_prefix+varlen+merge+async+rope",
        "shared_prefix+all",
        "prefix_cache+leaves+rope+async",
        "default",
    ]
)


def make_variant(ck, variant: str, token_budget: int):
    """The scorer a variant name describes (see VARIANT_HELP)."""
    from visualprm_ray.model.scoring import KernelOptions, make_scorer

    if variant == "default":
        return make_scorer(ck, token_budget=token_budget)
    mode, *names = variant.split("+")
    values, kernels = {}, "no_cudnn"
    for name in names:
        if name == "all":
            values.update(dict(SHORT_OPTIONS.values()))
        elif name == "cudnn":
            kernels = "default"
        elif name in SHORT_OPTIONS:
            key, value = SHORT_OPTIONS[name]
            values[key] = value
        else:
            raise ValueError(f"unknown option {name!r} in variant {variant!r}: {VARIANT_HELP}")
    return make_scorer(
        ck, token_budget=token_budget, mode=mode, sdpa_kernels=kernels, options=KernelOptions(**values)
    )


def set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers: the attention modules read the config at call time
        for cfg in (model.config, model.config.text_config, model.config.vision_config):
            cfg._attn_implementation = impl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes (for the test suite)")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=400)
    parser.add_argument(
        "--response-spread",
        type=float,
        default=0.0,
        help="draw each candidate's length from (1 +- SPREAD) x --response-tokens (0: all about equal)",
    )
    parser.add_argument("--upstream-groups", type=int, default=4, help="groups the slow loop scores")
    parser.add_argument("--token-budget", type=int, default=32768)
    parser.add_argument(
        "--variants", default=SESSION_VARIANTS, help=f"comma-separated variants to time: {VARIANT_HELP}"
    )
    parser.add_argument(
        "--fresh-shapes",
        action="store_true",
        help="time every variant on one set of freshly drawn groups, none of whose shapes the warm-ups saw",
    )
    parser.add_argument("--fp32-layers", type=int, default=2, help="depth of the float32 parity model")
    parser.add_argument(
        "--budgets", default="", help="extra token budgets to time with sdpa, comma-separated"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="default",
        default=None,
        metavar="VARIANT",
        help="print the top device kernels of one scorer call of VARIANT (default: the default)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers

    from visualprm_ray.model.prm import VisualPRM
    from visualprm_ray.model.reference import naive_step_scores
    from visualprm_ray.model.scoring import make_scorer
    from visualprm_ray.model.tiny_checkpoint import (
        TINY_LLM,
        TINY_VISION,
        upstream_config,
        write_tiny_checkpoint,
    )
    from visualprm_ray.model.tokenizer import load_tokenizer

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.groups, args.upstream_groups, args.response_tokens = min(args.groups, 2), 1, 60
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_tiny_checkpoint(tmp))
    llm = dict(REAL_LLM)
    if args.tiny:
        llm = {**TINY_LLM, "vocab_size": REAL_LLM["vocab_size"] // 100}
    vision = TINY_VISION if args.tiny else REAL_VISION
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args) | {"json": str(args.json)},
    }
    results: list[dict] = []

    # --- float32 parity on a real-width, reduced-depth model (exactness, not speed) -------------
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    depth = {"num_hidden_layers": args.fp32_layers}
    ck32 = build_checkpoint(
        upstream_config(llm=llm | depth, vision=vision | depth), tokenizer, dtype="float32", device=device
    )
    prm32 = VisualPRM(ck32, token_budget=args.token_budget)
    # Lengths spread by half either way, so the packed and padded candidate layouts both meet
    # candidates of different lengths.
    question, responses, image = make_groups(
        prm32,
        tokenizer,
        groups=1,
        candidates=args.candidates,
        response_tokens=min(args.response_tokens, 200),
        spread=0.5,
    )[0]
    tiles = prm32.tile(image)
    naive32 = [naive_step_scores(ck32, question, steps, tiles) for steps in responses]
    group32 = prm32.prepare(question, responses, image)
    parity: dict[str, float | str] = {}
    for variant in ["packed", "prefix_cache", *dict.fromkeys(variants)]:
        try:
            scored32 = make_variant(ck32, variant, args.token_budget).score([group32])[0]
        except Exception as exc:  # reported, not fatal: the timings below still run
            parity[variant] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        parity[variant] = max(float(np.abs(a - b).max()) for a, b in zip(scored32, naive32, strict=True))
    diffs = [d for d in parity.values() if isinstance(d, float)]
    diff32 = max(diffs) if len(diffs) == len(parity) else None
    report["fp32_parity_max_diff"] = diff32
    report["fp32_parity_by_mode"] = parity
    print(
        f"float32 parity ({args.fp32_layers}-layer real-width model), max |fast - naive| per mode: "
        + ", ".join(
            f"{m} {d:.2e}" if isinstance(d, float) else f"{m} FAILED ({d})" for m, d in parity.items()
        )
    )
    del ck32, prm32
    if device == "cuda":
        torch.cuda.empty_cache()

    # --- the full-size bf16 model ---------------------------------------------------------------
    start = time.perf_counter()
    ck = build_checkpoint(upstream_config(llm=llm, vision=vision), tokenizer, dtype="bfloat16", device=device)
    sync(device)
    report["build_s"] = round(time.perf_counter() - start, 1)
    prm = VisualPRM(ck, token_budget=args.token_budget)
    data = make_groups(
        prm,
        tokenizer,
        groups=args.groups,
        candidates=args.candidates,
        response_tokens=args.response_tokens,
        spread=args.response_spread,
    )
    start = time.perf_counter()
    prepared = [prm.prepare(q, r, img) for q, r, img in data]
    report["prepare_s_per_group"] = (time.perf_counter() - start) / len(prepared)
    work = work_of(prepared, ck.model, ck.model.config)
    report["work"] = work
    peak = measure_peak(device)
    report["peak_matmul_flops"] = peak
    rollouts = sum(g.num_candidates for g in prepared)
    mean_prefix = float(np.mean([len(g.prefix) for g in prepared]))
    mean_suffix = float(np.mean([len(s) for g in prepared for s in g.suffixes]))
    # What right-padded candidate rows would carry vs the real suffix tokens (packed rows).
    padded = sum(g.num_candidates * max(len(s) for s in g.suffixes) for g in prepared)
    report["suffix_tokens"] = {"real": sum(len(s) for g in prepared for s in g.suffixes), "padded": padded}
    print(
        f"{len(prepared)} groups x {args.candidates} candidates, {len(prepared[0].tiles)} tiles, "
        f"prefix {mean_prefix:.0f} tokens, suffix {mean_suffix:.0f} tokens "
        f"({report['suffix_tokens']['real']} real vs {padded} right-padded); model built in {report['build_s']} s"
    )

    # --- upstream-style loop on the first groups ------------------------------------------------
    up_groups = data[: args.upstream_groups]
    naive_scores = []
    naive_step_scores(ck, up_groups[0][0], up_groups[0][1][0], prm.tile(up_groups[0][2]))  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for q, resp, img in up_groups:
        tiles = prm.tile(img)  # upstream tiles per call too; keep it in the timed region
        naive_scores.append([naive_step_scores(ck, q, steps, tiles) for steps in resp])
    sync(device)
    up_time = time.perf_counter() - start
    n_up = sum(len(r) for _, r, _ in up_groups)
    up_flops = work["flops_upstream"] * len(up_groups) / len(prepared)
    results.append(
        {
            "path": "upstream loop",
            "rollouts": n_up,
            "seconds": up_time,
            "rollouts_per_s": n_up / up_time,
            "mfu": (up_flops / up_time / peak) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "max_diff_vs_upstream": 0.0,
        }
    )

    # --- the project's scorer, every variant on the same inputs ------------------------------------
    timed_groups = prepared
    if args.fresh_shapes:
        # One fresh draw for all variants: its shapes were never seen by a warm-up (which runs on
        # the first groups above), and every variant meets the same ones, so they compare.
        fresh = make_groups(
            prm, tokenizer, groups=args.groups, candidates=args.candidates,
            response_tokens=args.response_tokens, spread=args.response_spread, seed=1000,
        )  # fmt: skip
        timed_groups = [prm.prepare(q, r, img) for q, r, img in fresh]
    timed_rollouts = sum(g.num_candidates for g in timed_groups)
    timed_work = work_of(timed_groups, ck.model, ck.model.config)["flops_ours"]
    for variant in variants:
        try:
            scorer = make_variant(ck, variant, args.token_budget)
            scorer.score(prepared[:2])  # warm-up: compiles, allocator, kernel choice
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            scorer.score(timed_groups)
            sync(device)
            elapsed = time.perf_counter() - start
            scored = scorer.score(prepared[: len(up_groups)])
        except Exception as exc:  # a variant failing on this machine is reported, not fatal
            results.append({"path": f"ours ({variant})", "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        diff = max(
            float(np.abs(a - b).max())
            for g in range(len(up_groups))
            for a, b in zip(scored[g], naive_scores[g], strict=True)
        )
        results.append(
            {
                "path": f"ours ({variant})",
                "variant": variant,
                "mode": scorer.mode,
                "options": scorer.options.label(),
                "rollouts": timed_rollouts,
                "seconds": elapsed,
                "rollouts_per_s": timed_rollouts / elapsed,
                "mfu": (timed_work / elapsed / peak) if peak else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                "max_diff_vs_upstream": diff,
                "fp32_parity": parity.get(variant),
            }
        )
        del scorer
    defaults = [r["rollouts_per_s"] for r in results if r.get("variant") == "default"]
    upstream_rate = results[0]["rollouts_per_s"]
    for r in results[1:]:
        if "rollouts_per_s" in r:
            r["vs_upstream"] = r["rollouts_per_s"] / upstream_rate
            if defaults:
                r["vs_default"] = r["rollouts_per_s"] / defaults[0]
    set_attention(ck.model, "sdpa")
    for budget in [int(b) for b in args.budgets.split(",") if b.strip()]:
        scorer = make_scorer(ck, token_budget=budget)  # the default mode
        scorer.score(prepared[:2])
        sync(device)
        start = time.perf_counter()
        scorer.score(prepared)
        sync(device)
        elapsed = time.perf_counter() - start
        results.append(
            {
                "path": f"ours (default, budget {budget})",
                "rollouts": rollouts,
                "seconds": elapsed,
                "rollouts_per_s": rollouts / elapsed,
                "mfu": (work["flops_ours"] / elapsed / peak) if peak else None,
                "peak_mem_gib": None,
                "max_diff_vs_upstream": float("nan"),
            }
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        scorer = make_variant(ck, args.profile, args.token_budget)
        scorer.score(prepared[:2])  # compiles and first touches stay out of the profile
        sync(device)
        print(f"profile of {args.profile} ({scorer.mode}, options: {scorer.options.label() or 'none'}):")
        with profile(activities=activities) as prof:
            scorer.score(prepared[:4])
            sync(device)
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))

    report["results"] = results
    print(f"\ndevice: {report['device']}, torch {report['torch']}, transformers {report['transformers']}")
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
    print(
        f"work per group: ours {work['flops_ours'] / len(prepared) / 1e12:.1f} TFLOP, "
        f"upstream {work['flops_upstream'] / len(prepared) / 1e12:.1f} TFLOP"
    )
    header = f"{'path':<50} {'rollouts/s':>10} {'vs default':>10} {'vs loop':>8} {'MFU':>5} {'GiB':>5}"
    print(header + f" {'max|diff|':>9} {'fp32 diff':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['path']:<50} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['vs_default']:.3f}" if "vs_default" in r else "-"
        loop = f"{r['vs_upstream']:.2f}x" if "vs_upstream" in r else "-"
        fp32 = r.get("fp32_parity")
        fp32 = f"{fp32:.1e}" if isinstance(fp32, float) else "-" if fp32 is None else "FAILED"
        print(
            f"{r['path']:<50} {r['rollouts_per_s']:>10.2f} {ratio:>10} {loop:>8} {mfu:>5} {mem:>5}"
            f" {r['max_diff_vs_upstream']:>9.2e} {fp32:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
