"""Shared-prefix attention: a chunk of candidates attends to one copy of the group's prefix K/V.

In ``prefix_cache`` mode each candidate chunk gets the prefix keys/values copied into its own cache
(n candidates x ~3.5k prefix tokens x every layer), and the concatenation showed up as ~10% of
device time on an H200 (docs/PERFORMANCE.md). Here the attention of a chunk is split in two exact
parts instead:

- every query of every candidate against the one shared prefix K/V, with no mask (a candidate
  sees the whole prefix): one attention call over ``n x width`` queries;
- each candidate against its own keys, causally (right padding is never seen by a real query).

Softmax over the union of two key sets is the two partial results weighted by their
log-sum-exps, so the merge is exact up to rounding. The kernels that return the log-sum-exp are
PyTorch's own flash / memory-efficient / CPU flash ops; anywhere else the plain math is used.

Registered with transformers' attention interface under :data:`NAME`; without the
``visualprm_prefix`` keyword (the prefix forward, the vision tower) it is plain SDPA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NAME = "visualprm_shared_prefix"


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


def shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [n, H, width, D] queries -> [n, width, H, D] outputs."""
    prefix = kwargs.pop("visualprm_prefix", None)
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    n, heads, width, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    prefix_key, prefix_value = prefix[module.layer_idx]  # [1, kv heads, prefix, D]
    # All n x width queries as one row against the single prefix copy.
    flat = query.transpose(0, 1).reshape(1, heads, n * width, dim)
    out_p, lse_p = attention_with_lse(flat, prefix_key, prefix_value, scale, causal=False)
    out_p = out_p.reshape(heads, n, width, dim).transpose(0, 1)
    lse_p = lse_p.reshape(heads, n, width).transpose(0, 1)
    own = attention_with_lse(query, key, value, scale, causal=True)
    out = merge([(out_p, lse_p), own], query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`NAME` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
