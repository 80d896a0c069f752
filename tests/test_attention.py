"""Shared-prefix attention: kernels with log-sum-exp, the merge, and the whole function vs plain SDPA."""

from __future__ import annotations

import types

import pytest
import torch

from visualprm_ray import attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_output_and_lse_match_the_reference(dtype, tol, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 17, 16, generator=g).to(dtype)
    k = torch.randn(3, 2, 17, 16, generator=g).to(dtype)  # grouped-query: 4 query heads per K/V head
    v = torch.randn(3, 2, 17, 16, generator=g).to(dtype)
    out, lse = attention.attention_with_lse(q, k, v, 0.25, causal)
    ref_out, ref_lse = attention.reference_attention_with_lse(q, k, v, 0.25, causal)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert (out.float() - ref_out.float()).abs().max() < tol
    assert (lse - ref_lse).abs().max() < tol * 10


def test_merging_two_key_sets_is_attention_over_their_union():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k1, v1 = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g)
    k2, v2 = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 4, 3, 8, generator=g)
    parts = [attention.reference_attention_with_lse(q, k, v, 0.3, False) for k, v in ((k1, v1), (k2, v2))]
    union = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), scale=0.3
    )
    assert (attention.merge(parts, q.dtype) - union).abs().max() < 1e-6


def test_shared_prefix_attention_equals_sdpa_over_a_copied_prefix():
    """The fast function vs what prefix_cache mode computes: the prefix copied per candidate,
    then the candidate's own keys, causal, right-padded rows ignored."""
    g = torch.Generator().manual_seed(2)
    n, heads, kv_heads, width, prefix, dim = 3, 8, 2, 6, 11, 16
    lengths = [6, 4, 1]
    q = torch.randn(n, heads, width, dim, generator=g)
    k = torch.randn(n, kv_heads, width, dim, generator=g)
    v = torch.randn(n, kv_heads, width, dim, generator=g)
    pk = torch.randn(1, kv_heads, prefix, dim, generator=g)
    pv = torch.randn(1, kv_heads, prefix, dim, generator=g)
    module = types.SimpleNamespace(layer_idx=1)
    out, weights = attention.shared_prefix_attention(
        module, q, k, v, None, scaling=0.2, visualprm_prefix=[None, (pk, pv)]
    )
    assert weights is None and out.shape == (n, width, heads, dim)

    keys = torch.cat([pk.expand(n, -1, -1, -1), k], 2).repeat_interleave(4, dim=1)
    values = torch.cat([pv.expand(n, -1, -1, -1), v], 2).repeat_interleave(4, dim=1)
    pos = torch.arange(width)
    own = (pos.view(width, 1) >= pos.view(1, width)).expand(n, width, width)
    mask = torch.cat([torch.ones(n, width, prefix, dtype=torch.bool), own], 2).unsqueeze(1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.2)
    for j, length in enumerate(lengths):  # only real tokens are compared; padding is never read
        diff = (out[j, :length] - expected[j].transpose(0, 1)[:length]).abs().max()
        assert diff < 1e-5


def test_without_a_prefix_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1)
    out, _ = attention.shared_prefix_attention(module, q, k, v, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (out - expected.transpose(1, 2)).abs().max() < 1e-6
