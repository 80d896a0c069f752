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


def test_packing_round_trip_and_zero_padding():
    lengths = [5, 2, 3, 1]
    packing = attention.Packing.of(lengths, "cpu")
    assert packing.tokens == 11 and packing.width == 5
    x = torch.arange(1 * 3 * 11 * 2, dtype=torch.float32).view(1, 3, 11, 2) + 1
    padded = packing.to_padded(x)
    assert padded.shape == (4, 3, 5, 2)
    start = 0
    for j, n in enumerate(lengths):  # candidate j's tokens, in order, then zeros
        assert torch.equal(padded[j, :, :n], x[0, :, start : start + n])
        assert not padded[j, :, n:].any()
        start += n
    assert torch.equal(packing.to_packed(padded), x)


def test_shared_prefix_attention_equals_sdpa_over_a_copied_prefix():
    """The fast function vs what prefix_cache mode computes for each candidate: the prefix
    copied in front of the candidate's own keys, causal within them."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, prefix, dim = 8, 2, 11, 16
    lengths = [6, 4, 1, 6]
    tokens = sum(lengths)
    q = torch.randn(1, heads, tokens, dim, generator=g)
    k = torch.randn(1, kv_heads, tokens, dim, generator=g)
    v = torch.randn(1, kv_heads, tokens, dim, generator=g)
    pk = torch.randn(1, kv_heads, prefix, dim, generator=g)
    pv = torch.randn(1, kv_heads, prefix, dim, generator=g)
    module = types.SimpleNamespace(layer_idx=1)
    packing = attention.Packing.of(lengths, "cpu")
    out, weights = attention.shared_prefix_attention(
        module, q, k, v, None, scaling=0.2, visualprm_prefix=[None, (pk, pv)], visualprm_packing=packing
    )
    assert weights is None and out.shape == (1, tokens, heads, dim)

    start = 0
    for n in lengths:  # each candidate alone, the obvious way
        own = slice(start, start + n)
        keys = torch.cat([pk, k[:, :, own]], 2).repeat_interleave(4, dim=1)
        values = torch.cat([pv, v[:, :, own]], 2).repeat_interleave(4, dim=1)
        pos = torch.arange(n)
        mask = torch.cat([torch.ones(n, prefix, dtype=torch.bool), pos.view(n, 1) >= pos.view(1, n)], 1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, own], keys, values, attn_mask=mask, scale=0.2
        )
        assert (out[0, own] - expected[0].transpose(0, 1)).abs().max() < 1e-5
        start += n


def test_shared_prefix_attention_refuses_a_row_its_packing_does_not_describe():
    q = torch.zeros(1, 2, 5, 4)
    prefix = [(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))]
    module = types.SimpleNamespace(layer_idx=0)
    with pytest.raises(ValueError, match="packed row"):
        attention.shared_prefix_attention(
            module,
            q,
            q,
            q,
            None,
            visualprm_prefix=prefix,
            visualprm_packing=attention.Packing.of([2, 2], "cpu"),
        )
    with pytest.raises(ValueError, match="packed row"):
        attention.shared_prefix_attention(module, q, q, q, None, visualprm_prefix=prefix)


def test_without_a_prefix_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1)
    out, _ = attention.shared_prefix_attention(module, q, k, v, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (out - expected.transpose(1, 2)).abs().max() < 1e-6
