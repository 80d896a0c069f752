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


def _against_a_copied_prefix(
    *, device, dtype, heads, kv_heads, prefix, dim, lengths, attention, merge, scale, tol, spread=1.0
):
    """The fast function vs what prefix_cache mode computes for each candidate: the prefix copied
    in front of the candidate's own keys, causal within them, in float32 from the same inputs."""
    g = torch.Generator().manual_seed(2)
    tokens = sum(lengths)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # Queries scaled up so the attention is peaked, not a flat average near zero: a wrong
    # weighting of the two parts then shows as a large error.
    q = draw(1, heads, tokens, dim, scale=spread)
    k, v = draw(1, kv_heads, tokens, dim), draw(1, kv_heads, tokens, dim)
    pk, pv = draw(1, kv_heads, prefix, dim), draw(1, kv_heads, prefix, dim)
    module = types.SimpleNamespace(layer_idx=1)
    packing = shared_prefix.Packing.of(lengths, device, prefix=prefix, attention=attention, merge=merge)
    out, weights = shared_prefix.shared_prefix_attention(
        module, q, k, v, None, scaling=scale, visualprm_prefix=[None, (pk, pv)], visualprm_packing=packing
    )
    assert weights is None and out.shape == (1, tokens, heads, dim) and out.dtype == dtype
    worst = 0.0
    start = 0
    for n in lengths:  # each candidate alone, the obvious way
        own = slice(start, start + n)
        keys = torch.cat([pk, k[:, :, own]], 2).repeat_interleave(heads // kv_heads, dim=1).float()
        values = torch.cat([pv, v[:, :, own]], 2).repeat_interleave(heads // kv_heads, dim=1).float()
        pos = torch.arange(n, device=device)
        mask = torch.cat(
            [torch.ones(n, prefix, dtype=torch.bool, device=device), pos.view(n, 1) >= pos.view(1, n)], 1
        )
        scores = (q[:, :, own].float() @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        expected = torch.softmax(scores, dim=-1) @ values
        error = (out[0, own].float() - expected[0].transpose(0, 1)).abs().max() / expected.abs().max()
        worst = max(worst, float(error))
        start += n
    assert worst < tol, f"relative error {worst:.2e}"


@pytest.mark.parametrize("merge", ["eager", "compiled"])
@pytest.mark.parametrize("attention", ["padded", "varlen"])
def test_shared_prefix_attention_equals_attention_over_a_copied_prefix(attention, merge):
    _against_a_copied_prefix(
        device="cpu", dtype=torch.float32, heads=8, kv_heads=2, prefix=11, dim=16, lengths=[6, 4, 1, 6],
        attention=attention, merge=merge, scale=0.2, tol=1e-5,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("merge", ["eager", "compiled"])
@pytest.mark.parametrize("attention", ["padded", "varlen"])
def test_cuda_shared_prefix_attention_at_real_shapes(attention, merge):
    """bf16 on the device (flash, variable-length flash, the compiled merge) against float32 at
    VisualPRM-8B's shapes: 32 query heads over 8 key/value heads of 128, a ~3.5k-token prefix,
    8 candidates of ~400 tokens of different lengths."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    _against_a_copied_prefix(
        device="cuda", dtype=torch.bfloat16, heads=32, kv_heads=8, prefix=3551, dim=128,
        lengths=[416, 380, 455, 401, 290, 512, 433, 1], attention=attention, merge=merge,
        scale=128**-0.5, tol=2e-2, spread=3.0,
    )  # fmt: skip


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
