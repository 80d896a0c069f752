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


def _segments(lengths):
    return [0, *torch.cumsum(torch.tensor(lengths), 0).tolist()]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_is_each_segment_on_its_own(causal):
    g = torch.Generator().manual_seed(4)
    q_lengths, k_lengths = [5, 1, 7], ([5, 1, 7] if causal else [3, 9, 2])
    q = torch.randn(sum(q_lengths), 8, 16, generator=g)
    k = torch.randn(sum(k_lengths), 2, 16, generator=g)
    v = torch.randn(sum(k_lengths), 2, 16, generator=g)
    sq, sk = _segments(q_lengths), _segments(k_lengths)
    out, lse = attention.varlen_attention_with_lse(q, k, v, sq, sk, 0.3, causal)
    assert out.shape == q.shape and lse.shape == (8, sum(q_lengths))
    for i in range(len(q_lengths)):
        part = slice(sq[i], sq[i + 1])
        keys = slice(sk[i], sk[i + 1])
        ref_out, ref_lse = attention.reference_attention_with_lse(
            *(x.transpose(0, 1).unsqueeze(0) for x in (q[part], k[keys], v[keys])), 0.3, causal
        )
        assert (out[part] - ref_out[0].transpose(0, 1)).abs().max() < 2e-6
        assert (lse[:, part] - ref_lse[0]).abs().max() < 2e-5


@pytest.mark.parametrize("compiled", [False, True])
def test_merge_pair_is_attention_over_the_union_in_the_packed_layout(compiled):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 5, 8, generator=g)
    k1, v1 = torch.randn(1, 4, 7, 8, generator=g), torch.randn(1, 4, 7, 8, generator=g)
    k2, v2 = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 4, 3, 8, generator=g)
    parts = [attention.reference_attention_with_lse(q, k, v, 0.3, False) for k, v in ((k1, v1), (k2, v2))]
    packed = [(out[0].transpose(0, 1), lse[0]) for out, lse in parts]  # [tokens, H, D], [H, tokens]
    merge = attention.compiled_merge_pair() if compiled else attention.merge_pair
    merged = merge(*packed[0], *packed[1])
    union = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), scale=0.3
    )
    assert merged.shape == (5, 4, 8) and merged.is_contiguous()
    assert (merged - union[0].transpose(0, 1)).abs().max() < 1e-6


# -- on a CUDA device (`pytest -m gpu`): the flash kernels the CPU cannot reach -------------------
# bf16 at VisualPRM-8B's attention shapes (32 query heads over 8 key/value heads of 128, a
# ~3.5k-token prefix) against float32 from the same bf16 inputs, so the only error is the kernel's
# own rounding; the log-sum-exp is checked directly, where a base-2 slip is off by ~40%.


def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    return "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_output_and_lse_at_real_shapes(causal):
    device = _cuda()
    g = torch.Generator().manual_seed(6)
    length = 3551 if not causal else 3200
    q = (torch.randn(1, 32, 3200, 128, generator=g) * 3).to(device, torch.bfloat16)
    k = torch.randn(1, 8, length, 128, generator=g).to(device, torch.bfloat16)
    v = torch.randn(1, 8, length, 128, generator=g).to(device, torch.bfloat16)
    out, lse = attention.attention_with_lse(q, k, v, 128**-0.5, causal)
    ref_out, ref_lse = attention.reference_attention_with_lse(
        q.float(), k.float(), v.float(), 128**-0.5, causal
    )
    assert out.dtype == torch.bfloat16 and lse.shape == (1, 32, 3200)
    assert (out.float() - ref_out).abs().max() / ref_out.abs().max() < 2e-2
    assert (lse - ref_lse).abs().max() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_flash_at_real_shapes(causal):
    device = _cuda()
    g = torch.Generator().manual_seed(7)
    q_lengths = [416, 380, 455, 401, 290, 512, 433, 1]
    k_lengths = q_lengths if causal else [3551] * len(q_lengths)
    q = (torch.randn(sum(q_lengths), 32, 128, generator=g) * 3).to(device, torch.bfloat16)
    k = torch.randn(sum(k_lengths), 8, 128, generator=g).to(device, torch.bfloat16)
    v = torch.randn(sum(k_lengths), 8, 128, generator=g).to(device, torch.bfloat16)
    sq, sk = _segments(q_lengths), _segments(k_lengths)
    out, lse = attention.varlen_attention_with_lse(q, k, v, sq, sk, 128**-0.5, causal)
    assert out.shape == q.shape and lse.shape == (32, sum(q_lengths))
    for i in range(len(q_lengths)):
        part, keys = slice(sq[i], sq[i + 1]), slice(sk[i], sk[i + 1])
        ref_out, ref_lse = attention.reference_attention_with_lse(
            *(x.float().transpose(0, 1).unsqueeze(0) for x in (q[part], k[keys], v[keys])), 128**-0.5, causal
        )
        assert (out[part].float() - ref_out[0].transpose(0, 1)).abs().max() / ref_out.abs().max() < 2e-2
        assert (lse[:, part] - ref_lse[0]).abs().max() < 1e-2
