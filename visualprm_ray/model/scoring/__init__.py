"""The fast scorer: each image encoded once, each group's shared prefix computed once (SPEC §3).

Upstream scores a group of N candidates with N full forwards, each re-encoding the image and
re-reading the ~3.5k-token prefix. Here the common token prefix runs once and every candidate's
suffix is computed against it, with position ids that continue from the prefix length. Causal
attention makes every candidate's hidden states identical to those of its own full forward, so
the scores are the same numbers for a fraction of the work. Work is cut by a token budget rather
than a row count, and P(+) is computed from the two logits of '+' and '-' only, in float32, at the
score positions only.

Three layouts do that, one file each, behind one interface (:class:`.base.LayoutScorer`):

- :mod:`.packed`: one row per group, prefix then candidates, under a tree-shaped mask;
- :mod:`.prefix_cache`: the prefix once, then right-padded candidate rows with its K/V copied in;
- :mod:`.shared_prefix`: the prefix once, then candidates packed end to end without padding,
  attending to a single copy of its K/V (attention in two parts merged exactly, :mod:`.attention`).

:mod:`.base` holds what they share (vision windows, image embedding, score-row gathering, budget
chunks); :func:`make_scorer` picks one. :mod:`.options` lists the optional fast paths (variable-
length flash, a compiled merge, compiled leaf functions, a static rotary table, fewer host syncs),
each off by default, each tested against the naive forward; :mod:`.leaves` swaps in the ones that
act on the model itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from visualprm_ray.model.scoring.base import DEFAULT_TOKEN_BUDGET, DEFAULT_VISION_BATCH, LayoutScorer
from visualprm_ray.model.scoring.options import KernelOptions

if TYPE_CHECKING:
    from visualprm_ray.model.checkpoint import LoadedCheckpoint

__all__ = [
    "DEFAULT_TOKEN_BUDGET",
    "DEFAULT_VISION_BATCH",
    "KernelOptions",
    "LayoutScorer",
    "PrefixMode",
    "make_scorer",
]

# packed: one row per group, tree mask (any attention backend, groups batched together);
# prefix_cache: prefix forward once, candidates against its K/V (attention never spans candidates).
# shared_prefix: the same, with a chunk's candidates packed into one row without padding and
# attending to one shared copy of the prefix K/V.
PrefixMode = Literal["auto", "packed", "prefix_cache", "shared_prefix"]


def make_scorer(
    checkpoint: LoadedCheckpoint,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    vision_batch: int = DEFAULT_VISION_BATCH,
    mode: PrefixMode = "auto",
    sdpa_kernels: Literal["default", "no_cudnn"] = "no_cudnn",
    options: KernelOptions | None = None,
) -> LayoutScorer:
    """The scorer of layout ``mode`` for one loaded checkpoint on its device, computing with
    ``options`` (:mod:`.options`: every fast path off unless asked for)."""
    options = options or KernelOptions()
    if options.needs_shared_prefix:
        if mode not in ("auto", "shared_prefix"):
            raise ValueError(f"{options.label()} applies to prefix_mode 'shared_prefix' only, not {mode!r}")
        mode = "shared_prefix"
    if mode == "auto":
        attn = checkpoint.model.config._attn_implementation
        device_type = next(checkpoint.model.parameters()).device.type
        # The prefix once beats the packed tree wherever it applies (measured on CPU and GPU,
        # docs/PERFORMANCE.md); flex attention expresses the packed tree block-sparsely, so it
        # keeps the packed rows. Sharing the prefix K/V without copies (shared_prefix) measured
        # faster on CPU; on CUDA it waits for a GPU measurement, so prefix_cache stays there.
        mode = (
            "packed"
            if attn == "flex_attention"
            else "shared_prefix"
            if device_type == "cpu"
            else "prefix_cache"
        )
    if mode == "packed":
        from visualprm_ray.model.scoring.packed import PackedScorer as cls
    elif mode == "prefix_cache":
        from visualprm_ray.model.scoring.prefix_cache import PrefixCacheScorer as cls
    elif mode == "shared_prefix":
        from visualprm_ray.model.scoring.shared_prefix import SharedPrefixScorer as cls
    else:
        raise ValueError(f"unknown prefix mode {mode!r}")
    return cls(
        checkpoint,
        token_budget=token_budget,
        vision_batch=vision_batch,
        sdpa_kernels=sdpa_kernels,
        options=options,
    )
