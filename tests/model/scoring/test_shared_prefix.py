"""The shared_prefix layout's packing and attention function, against plain SDPA."""

from __future__ import annotations

import types

import pytest
import torch

from visualprm_ray.model.scoring import shared_prefix


def test_packing_round_trip_and_zero_padding():
    lengths = [5, 2, 3, 1]
    packing = shared_prefix.Packing.of(lengths, "cpu")
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
    packing = shared_prefix.Packing.of(lengths, "cpu")
    out, weights = shared_prefix.shared_prefix_attention(
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
        shared_prefix.shared_prefix_attention(
            module,
            q,
            q,
            q,
            None,
            visualprm_prefix=prefix,
            visualprm_packing=shared_prefix.Packing.of([2, 2], "cpu"),
        )
    with pytest.raises(ValueError, match="packed row"):
        shared_prefix.shared_prefix_attention(module, q, q, q, None, visualprm_prefix=prefix)


def test_without_a_prefix_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1)
    out, _ = shared_prefix.shared_prefix_attention(module, q, k, v, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (out - expected.transpose(1, 2)).abs().max() < 1e-6
