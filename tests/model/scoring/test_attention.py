"""Attention kernels with their log-sum-exp, and the exact merge of two key sets."""

from __future__ import annotations

import pytest
import torch

from visualprm_ray.model.scoring import attention


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
