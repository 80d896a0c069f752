"""The leaf functions swapped in by leaf_ops='compiled', against the model modules they replace."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from visualprm_ray.model.scoring import leaves


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
@torch.inference_mode()
def test_rms_norm_silu_mul_and_rotation_are_the_models_own(config, dtype, compiled):
    g = torch.Generator().manual_seed(0)
    pick = leaves.compiled if compiled else {"rms_norm": leaves.rms_norm, "silu_mul": leaves.silu_mul}.get
    rotate = leaves.compiled("rotate") if compiled else leaves.rotate
    # Eager: the same operations as transformers', so bit for bit; compiled: fused, float32 inside,
    # so within a couple of bf16 roundings (relative to the largest value).
    tol = 0.0 if not compiled else (1e-6 if dtype == torch.float32 else 2e-2)

    def close(a, b):
        return (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()

    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(64, generator=g).to(dtype)
    x = (torch.randn(2, 7, 64, generator=g) * 3).to(dtype)
    assert close(pick("rms_norm")(x, norm.weight, norm.variance_epsilon), norm(x))

    mlp = modeling_llama.LlamaMLP(config).to(dtype)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert close(pick("silu_mul")(gate, up), mlp.act_fn(gate) * up)

    q = torch.randn(1, 4, 7, 16, generator=g).to(dtype)
    k = torch.randn(1, 2, 7, 16, generator=g).to(dtype)
    rotary = modeling_llama.LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    )
    cos, sin = rotary(q, torch.arange(5, 12).unsqueeze(0))
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = rotate(q, k, cos, sin)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and close(a, b)


def test_a_model_that_is_not_silu_is_refused_rather_than_computed_wrong():
    model = modeling_llama.LlamaModel(
        LlamaConfig(
            hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
            num_hidden_layers=1, vocab_size=50, hidden_act="gelu",
        )
    )  # fmt: skip
    from visualprm_ray.model.scoring.options import KernelOptions

    with (
        pytest.raises(ValueError, match="SwiGLU with silu"),
        leaves.patched(model, KernelOptions(leaf_ops="compiled")),
    ):
        pass
    assert not [m for m in model.modules() if "forward" in vars(m)]
