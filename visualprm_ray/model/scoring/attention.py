"""Attention with its log-sum-exp, and the exact merge of attention over two key sets.

Softmax attention over the union of two key sets is the two partial results weighted by their
log-sum-exps, so attention of a query over (prefix keys + its own keys) can be computed as two
separate calls and merged exactly up to rounding (the ``shared_prefix`` layout,
:mod:`visualprm_ray.model.scoring.shared_prefix`). The kernels that return the log-sum-exp are
PyTorch's own flash / memory-efficient / CPU flash ops; anywhere else the plain math is used, and
:func:`reference_attention_with_lse` is the slow, obvious version they are all tested against.
"""

from __future__ import annotations

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


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention over the union of the parts' keys, from each part's output and LSE."""
    import torch

    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    out = sum(o.float() * torch.exp(lse - total).unsqueeze(-1) for o, lse in parts)
    return out.to(dtype)
