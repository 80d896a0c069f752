"""Attention with its log-sum-exp, and the exact merge of attention over two key sets.

Softmax attention over the union of two key sets is the two partial results weighted by their
log-sum-exps, so attention of a query over (prefix keys + its own keys) can be computed as two
separate calls and merged exactly up to rounding (the ``shared_prefix`` layout,
:mod:`visualprm_ray.model.scoring.shared_prefix`). The kernels that return the log-sum-exp are
PyTorch's own flash / memory-efficient / CPU flash ops; anywhere else the plain math is used, and
:func:`reference_attention_with_lse` is the slow, obvious version they are all tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V heads repeated to the query heads (grouped-query attention); the LSE kernels need equal heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, L, D] and the float32 log-sum-exp of each query's scores [B, H, L]."""
    import torch

    key, value = _repeat_heads(key, query.shape[1]), _repeat_heads(value, query.shape[1])
    length = query.shape[2]
    if query.device.type == "cuda":
        if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, causal, False, scale=scale
            )[:2]
            return out, lse[..., :length]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, 0.0, causal, scale=scale
        )[:2]
        return out, lse[..., :length]  # the kernel pads the LSE to a multiple of 32
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=None, scale=scale
        )
        return out, lse
    return reference_attention_with_lse(query, key, value, scale, causal)


def reference_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, the slow and obvious way (float32 scores): the kernels are tested against it."""
    import torch

    key, value = _repeat_heads(key, query.shape[1]), _repeat_heads(value, query.shape[1])
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if causal:
        q_len, k_len = scores.shape[-2:]
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()  # as SDPA: top-left
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ value.float()
    return out.to(query.dtype), lse


def merge_pair(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """The merge of two parts in the packed layout: outputs ``[tokens, H, D]``, LSEs ``[H, tokens]``.

    Float32 inside, the outputs' dtype out, written as ``[tokens, H, D]``: the layout the output
    projection reads (``[1, tokens, H * D]`` without a copy). :func:`compiled_merge_pair` is the
    same function as one fused kernel.
    """
    import torch

    total = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - total).transpose(0, 1).unsqueeze(-1)
    weight_b = torch.exp(lse_b - total).transpose(0, 1).unsqueeze(-1)
    merged = out_a.float() * weight_a + out_b.float() * weight_b
    # Elementwise results follow their inputs' strides (transposed views here): the dtype
    # conversion writes them out row-major, in the same pass.
    return torch.empty(merged.shape, dtype=out_a.dtype, device=merged.device).copy_(merged)


@cache
def compiled_merge_pair() -> Callable[..., torch.Tensor]:
    """:func:`merge_pair` compiled once per process for any number of tokens (``dynamic=True``)."""
    import torch

    return torch.compile(merge_pair, dynamic=True)


def varlen_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    starts_q: Sequence[int],
    starts_k: Sequence[int],
    scale: float,
    causal: bool,
    cumulative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed sequences: segment i's queries ``query[starts_q[i]:starts_q[i + 1]]``
    attend to its keys ``key[starts_k[i]:starts_k[i + 1]]`` only (causally: top-left aligned).

    ``query`` is ``[tokens, H, D]``, ``key``/``value`` ``[keys, H_kv, D]`` with ``H`` a multiple of
    ``H_kv`` (grouped-query heads, never repeated here). Returns ``[tokens, H, D]`` and the float32
    LSE ``[H, tokens]``. On CUDA in half precision it is one variable-length flash call
    (``cumulative``: the two offset lists as int32 tensors on the device, built once per chunk
    rather than once per layer); elsewhere each segment goes through :func:`attention_with_lse`,
    which is the reference layout the flash call is tested against.
    """
    import torch

    tokens = query.shape[0]
    if (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
    ):
        if cumulative is None:
            cumulative = tuple(
                torch.tensor(list(s), dtype=torch.int32, device=query.device) for s in (starts_q, starts_k)
            )
        max_q = max(b - a for a, b in pairwise(starts_q))
        max_k = max(b - a for a, b in pairwise(starts_k))
        # Row and head strides are the kernel's to read; only the last dimension must be dense.
        query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
        out, lse = torch.ops.aten._flash_attention_forward(
            query, key, value, cumulative[0], cumulative[1], max_q, max_k, 0.0, causal, False, scale=scale
        )[:2]
        if tuple(lse.shape) != (query.shape[1], tokens):
            raise AssertionError(
                f"variable-length flash LSE of shape {tuple(lse.shape)}, not [heads, tokens]"
            )
        return out, lse
    outs, lses = [], []
    if len(starts_q) != len(starts_k):
        raise ValueError("as many query segments as key segments")
    for (qa, qb), (ka, kb) in zip(pairwise(starts_q), pairwise(starts_k), strict=True):
        if qa == qb:
            continue  # no queries: nothing to compute (the kernels do not take empty segments)
        out, lse = attention_with_lse(
            query[qa:qb].transpose(0, 1).unsqueeze(0),
            key[ka:kb].transpose(0, 1).unsqueeze(0),
            value[ka:kb].transpose(0, 1).unsqueeze(0),
            scale,
            causal,
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return query.new_zeros(query.shape), query.new_zeros(query.shape[1], 0, dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses, dim=1)
