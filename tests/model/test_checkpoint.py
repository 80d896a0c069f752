"""Tests for visualprm_ray.model.checkpoint: the in-memory conversion of upstream InternVL checkpoints.

The language model and the vision tower of the converted native model are compared with plain
references written from the upstream math (InternLM2 with grouped ``wqkv``; InternViT with fused
``qkv``, pixel shuffle v2 and ``mlp1``) that read the UPSTREAM tensors straight from the
checkpoint's ``model.safetensors``: they share no code with the loader under test.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from visualprm_ray.model.checkpoint import (
    CheckpointError,
    _split_grouped_wqkv,
    _SplitShapes,
    load_checkpoint,
)
from visualprm_ray.model.prompt import ASSISTANT_ROLE, IMG_CONTEXT, SCORE_MARKER
from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json")
CONVERSATION = (
    "<|im_start|>user\n### Question:\nFind the area of the triangle ABC.\n\n"
    "### Solution Process:\nStep 1: base 12 cm<|im_end|>\n"
    "<|im_start|>assistant\n+<|im_end|>\n"
)
# float32 round-off is a few 1e-6 on these logits (|logit| <= ~5; a 65-token input already reaches
# ~5e-5 on |logit| ~18, float32 reference vs float64 reference), hence a short input for the absolute
# float32 bound; the exactness of the conversion itself is asserted in float64.
LM_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-10


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_checkpoint(tiny_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def loaded64(tiny_dir):
    return load_checkpoint(tiny_dir, dtype=torch.float64, device="cpu")


@pytest.fixture(scope="module")
def upstream(tiny_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((tiny_dir / "config.json").read_text())
    return config, load_file(str(tiny_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def input_ids(loaded) -> torch.Tensor:
    ids = loaded.tokenizer.encode(CONVERSATION)
    assert 30 <= len(ids) <= 60, len(ids)
    assert loaded.tokenizer.token_to_id(IMG_CONTEXT) not in ids
    return torch.tensor(ids, dtype=torch.long)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


# ---------------------------------------------------------------------------------------------
# Reference InternLM2 (from the math; upstream tensor names)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, in_float32: bool = True) -> torch.Tensor:
    # Upstream normalises in float32 whatever the model dtype, then scales in the model dtype.
    xn = x.float() if in_float32 else x
    return weight * (xn / torch.sqrt(xn.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_internlm2_logits(
    config: dict, w: dict[str, torch.Tensor], ids: torch.Tensor, *, norm_in_float32: bool = True
) -> torch.Tensor:
    """Logits [seq, vocab] in the dtype of ``w``; RMSNorm in float32 unless ``norm_in_float32`` is off."""
    llm = config["llm_config"]
    assert llm["bias"] is False
    hidden, heads, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    head_dim, groups, eps = hidden // heads, heads // kv, llm["rms_norm_eps"]
    # Dynamic NTK scaling only changes anything beyond max_position_embeddings.
    assert len(ids) < llm["max_position_embeddings"]
    seq = len(ids)
    dtype = w["language_model.model.tok_embeddings.weight"].dtype

    # Upstream computes the rotary angles in float32 whatever the model dtype, then casts cos/sin.
    inv_freq = 1.0 / (float(llm["rope_theta"]) ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)  # [seq, 1, head_dim]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    x = w["language_model.model.tok_embeddings.weight"][ids]
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        n = _rms_norm(x, w[p + "attention_norm.weight"], eps, norm_in_float32)
        qkv = (n @ w[p + "attention.wqkv.weight"].T).view(seq, kv, groups + 2, head_dim)
        q = qkv[:, :, :groups].reshape(seq, heads, head_dim)  # query head kv_index * G + g
        k, v = qkv[:, :, groups], qkv[:, :, groups + 1]  # [seq, kv, head_dim]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = torch.empty(seq, heads, head_dim, dtype=dtype)
        for h in range(heads):
            kv_index = h // groups
            scores = (q[:, h] @ k[:, kv_index].T) / math.sqrt(head_dim)
            scores = scores.masked_fill(~causal, float("-inf"))
            out[:, h] = scores.softmax(dim=-1) @ v[:, kv_index]
        x = x + out.reshape(seq, heads * head_dim) @ w[p + "attention.wo.weight"].T
        n = _rms_norm(x, w[p + "ffn_norm.weight"], eps, norm_in_float32)
        gate = F.silu(n @ w[p + "feed_forward.w1.weight"].T)
        up = n @ w[p + "feed_forward.w3.weight"].T
        x = x + (gate * up) @ w[p + "feed_forward.w2.weight"].T
    x = _rms_norm(x, w["language_model.model.norm.weight"], eps, norm_in_float32)
    return x @ w["language_model.output.weight"].T


# ---------------------------------------------------------------------------------------------
# Reference InternViT + pixel shuffle v2 + mlp1 (from the math; upstream tensor names)


def reference_pixel_shuffle_v2(x: torch.Tensor, scale: float) -> torch.Tensor:
    n, width, height, c = x.shape
    x = x.view(n, width, int(height * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(height * scale), int(width * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def reference_internvit_features(
    config: dict, w: dict[str, torch.Tensor], pixels: torch.Tensor, *, transpose_grid: bool = False
) -> torch.Tensor:
    vis = config["vision_config"]
    assert vis["qk_normalization"] is False and vis["norm_type"] == "layer_norm"
    hidden, heads, eps = vis["hidden_size"], vis["num_attention_heads"], vis["layer_norm_eps"]
    head_dim = hidden // heads
    batch = pixels.shape[0]

    patches = F.conv2d(
        pixels,
        w["vision_model.embeddings.patch_embedding.weight"],
        w["vision_model.embeddings.patch_embedding.bias"],
        stride=vis["patch_size"],
    )  # [B, H, 32, 32]
    patches = patches.flatten(2).transpose(1, 2)  # [B, 1024, H], row-major over the grid
    cls = w["vision_model.embeddings.class_embedding"].expand(batch, 1, hidden)
    x = torch.cat((cls, patches), dim=1) + w["vision_model.embeddings.position_embedding"]
    tokens = x.shape[1]

    for i in range(vis["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        n = F.layer_norm(x, (hidden,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        qkv = n @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        qkv = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-1, -2)) / math.sqrt(head_dim)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        a = a @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        x = x + w[p + "ls1"] * a
        n = F.layer_norm(x, (hidden,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        m = F.gelu(n @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        m = m @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        x = x + w[p + "ls2"] * m

    x = x[:, 1:]  # drop the class token
    side = math.isqrt(x.shape[1])
    x = x.reshape(batch, side, side, hidden)
    if transpose_grid:  # a deliberately wrong variant, to show the comparison can tell
        x = x.transpose(1, 2).contiguous()
    x = reference_pixel_shuffle_v2(x, config["downsample_ratio"])
    x = x.reshape(batch, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    x = F.gelu(x @ w["mlp1.1.weight"].T + w["mlp1.1.bias"])
    return x @ w["mlp1.3.weight"].T + w["mlp1.3.bias"]


# ---------------------------------------------------------------------------------------------
# 1-2. Numerical agreement with the references


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_language_model_matches_internlm2_reference(loaded, loaded64, upstream, input_ids, monkeypatch):
    config, weights = upstream
    ref = reference_internlm2_logits(config, weights, input_ids)
    got = _logits(loaded.model, input_ids)
    assert got.dtype == torch.float32
    assert got.shape == ref.shape == (len(input_ids), config["llm_config"]["vocab_size"])
    # The logits must vary over positions and vocabulary for the comparison to mean anything.
    assert ref.std(dim=0).mean() > 0.1 and ref.std(dim=1).mean() > 0.1
    scale = ref.abs().max().item()
    diff = _max_diff(got, ref)
    # The same through the language model and the head directly.
    with torch.no_grad():
        hidden = loaded.model.model.language_model(input_ids=input_ids[None]).last_hidden_state
        direct = loaded.model.lm_head(hidden)[0]
    diff_direct = _max_diff(direct, ref)

    # Exactness of the conversion, free of float32 round-off: everything in float64, RMSNorm
    # included (transformers' LlamaRMSNorm, like upstream, normalises in float32 otherwise).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms_norm_native_dtype(self, x):
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_native_dtype)
    weights64 = {k: v.double() for k, v in weights.items()}
    ref64 = reference_internlm2_logits(config, weights64, input_ids, norm_in_float32=False)
    diff64 = _max_diff(_logits(loaded64.model, input_ids), ref64)
    print(
        f"\n[checkpoint] LM logits vs InternLM2 reference over {tuple(ref.shape)} (max |logit| {scale:.2f}): "
        f"float32 max abs diff {diff:.3e} (via language_model + lm_head {diff_direct:.3e}); "
        f"float64 max abs diff {diff64:.3e}"
    )
    assert diff < LM_TOLERANCE
    assert diff_direct < LM_TOLERANCE
    assert diff64 < FLOAT64_TOLERANCE


def _image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_vision_features_match_internvit_reference(loaded, loaded64, upstream):
    config, weights = upstream
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1234))
    ref = reference_internvit_features(config, weights, pixels)
    got = _image_features(loaded.model, pixels)
    assert got.dtype == torch.float32
    assert got.shape == ref.shape == (2, 256, config["llm_config"]["hidden_size"])
    scale = ref.abs().max().item()
    diff = _max_diff(got, ref)

    weights64 = {k: v.double() for k, v in weights.items()}
    ref64 = reference_internvit_features(config, weights64, pixels.double())
    diff64 = _max_diff(_image_features(loaded64.model, pixels.double()), ref64)
    print(
        f"\n[checkpoint] vision features vs InternViT reference over {tuple(ref.shape)} "
        f"(max |feature| {scale:.2f}): float32 max abs diff {diff:.3e} (relative {diff / scale:.3e}); "
        f"float64 max abs diff {diff64:.3e}"
    )
    assert diff < RELATIVE_TOLERANCE * scale
    assert diff64 < FLOAT64_TOLERANCE
    # The two images give different features, and a transposed grid (a pixel-shuffle orientation
    # bug) would be caught by far more than the tolerance.
    assert _max_diff(ref[0], ref[1]) > 0.1 * scale
    wrong = reference_internvit_features(config, weights, pixels, transpose_grid=True)
    assert _max_diff(got, wrong) > 0.1 * scale


# ---------------------------------------------------------------------------------------------
# 3. The grouped wqkv split


def _label(kv_index: int, slot: int, dim: int) -> float:
    return 1000.0 * kv_index + 100.0 * slot + dim


HIDDEN = 7


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (8, 2, 3), (4, 4, 5), (6, 1, 2)])
def test_grouped_wqkv_split_is_not_plain_chunking(heads, kv_heads, head_dim):
    groups = heads // kv_heads
    labels = torch.tensor(
        [
            _label(kv, slot, d)
            for kv in range(kv_heads)
            for slot in range(groups + 2)
            for d in range(head_dim)
        ],
        dtype=torch.float64,
    )
    # A weight [rows, hidden] whose row r is labels[r] * 10 + column: exact in float64.
    weight = labels[:, None] * 10 + torch.arange(HIDDEN, dtype=torch.float64)[None, :]
    shapes = _SplitShapes(heads, kv_heads, head_dim)

    def expected_rows(label_list: list[float]) -> torch.Tensor:
        return torch.tensor(label_list, dtype=torch.float64)

    want_q = expected_rows(
        [_label(h // groups, h % groups, d) for h in range(heads) for d in range(head_dim)]
    )  # query head h = kv_index * G + g
    want_k = expected_rows([_label(kv, groups, d) for kv in range(kv_heads) for d in range(head_dim)])
    want_v = expected_rows([_label(kv, groups + 1, d) for kv in range(kv_heads) for d in range(head_dim)])

    q, k, v = _split_grouped_wqkv("wqkv", labels, shapes)  # a bias-shaped (1-D) tensor
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)
    q, k, v = _split_grouped_wqkv("wqkv", weight, shapes)  # a weight: columns travel with their rows
    columns = torch.arange(HIDDEN, dtype=torch.float64)[None, :]
    assert torch.equal(q, want_q[:, None] * 10 + columns)
    assert torch.equal(k, want_k[:, None] * 10 + columns)
    assert torch.equal(v, want_v[:, None] * 10 + columns)

    # Plain block splitting [q | k | v] agrees with the grouped layout only for a single kv head.
    naive = labels.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    same = all(torch.equal(a, b) for a, b in zip(naive, (want_q, want_k, want_v), strict=True))
    assert same == (kv_heads == 1)


def test_naive_wqkv_split_changes_the_logits(tiny_dir, upstream, input_ids, monkeypatch):
    """Loading with a naive contiguous split gives logits far from the reference: the test above matters."""
    import visualprm_ray.model.checkpoint as checkpoint

    def naive(name, tensor, s):
        return tensor.split(
            [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
        )

    monkeypatch.setattr(checkpoint, "_split_grouped_wqkv", naive)
    wrong = load_checkpoint(tiny_dir, dtype="float32")
    config, weights = upstream
    ref = reference_internlm2_logits(config, weights, input_ids)
    assert (_logits(wrong.model, input_ids) - ref).abs().max().item() > 1000 * LM_TOLERANCE


# ---------------------------------------------------------------------------------------------
# 4. Strict loading


def _with_weights(tiny_dir: Path, dst: Path, edit) -> Path:
    _copy_checkpoint(tiny_dir, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("vision_model.encoder.layers.0.attn.unknown.weight", 4),
        ("foo.bar", 4),
        ("language_model.model.layers.7.feed_forward.w1.weight", 4),  # a layer the config lacks
        # bias=False upstream: a bias (of a splittable size) must not be dropped silently.
        ("language_model.model.layers.0.attention.wqkv.bias", (4 + 2 * 2) * 16),
        ("vision_model.encoder.layers.0.attn.qkv.extra", 3 * 32),
        ("language_model.model.layers.0.attention.wo.bias", 64),
    ],
)
def test_unexpected_tensor_is_an_error(tiny_dir, tmp_path, name, size):
    def add(w):
        w[name] = torch.zeros(size)

    bad = _with_weights(tiny_dir, tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad, dtype="float32")
    assert name in str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "language_model.model.layers.1.ffn_norm.weight",
        "language_model.output.weight",
        "vision_model.encoder.layers.1.ls2",
        "mlp1.0.bias",
        "language_model.model.layers.0.attention.wqkv.weight",
    ],
)
def test_missing_tensor_is_an_error(tiny_dir, tmp_path, name):
    bad = _with_weights(tiny_dir, tmp_path / "ckpt", lambda w: w.pop(name))
    with pytest.raises(CheckpointError, match="misses"):
        load_checkpoint(bad, dtype="float32")


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("language_model.model.layers.0.attention.wo.weight", lambda t: t[:, :-1].contiguous()),
        ("vision_model.embeddings.position_embedding", lambda t: t[:, :-1].contiguous()),
        ("mlp1.1.weight", lambda t: t.T.contiguous()),
        ("language_model.model.tok_embeddings.weight", lambda t: t[:-1].contiguous()),
        ("vision_model.encoder.layers.1.attn.qkv.weight", lambda t: t[:-3].contiguous()),
        pytest.param(
            "language_model.model.layers.1.attention.wqkv.weight",
            lambda t: t[:-16].contiguous(),
            id="wqkv-rows",
        ),
        pytest.param(
            "language_model.model.layers.1.attention.wqkv.weight",
            lambda t: t[:, :-1].contiguous(),
            id="wqkv-columns",
        ),
        pytest.param(
            "vision_model.encoder.layers.0.attn.qkv.bias",
            lambda t: t[:2].contiguous(),
            id="vision-qkv-bias-rows",
        ),
    ],
)
def test_wrong_shape_is_an_error(tiny_dir, tmp_path, name, edit):
    def reshape(w):
        w[name] = edit(w[name])

    bad = _with_weights(tiny_dir, tmp_path / "ckpt", reshape)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad, dtype="float32")
    assert name in str(err.value)


def test_tensor_in_two_files_is_an_error(tiny_dir, tmp_path):
    bad = _copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    save_file(
        {"mlp1.3.bias": load_file(str(bad / "model.safetensors"))["mlp1.3.bias"]},
        str(bad / "model-extra.safetensors"),
    )
    with pytest.raises(CheckpointError, match="twice"):
        load_checkpoint(bad, dtype="float32")


def test_unmodified_copy_loads(tiny_dir, tmp_path):
    """The strictness tests' round trip through load_file/save_file alone is not what fails them."""
    good = _with_weights(tiny_dir, tmp_path / "ckpt", lambda w: None)
    assert load_checkpoint(good, dtype="float32").info.layout == "upstream"


# ---------------------------------------------------------------------------------------------
# 5. Untied embeddings


def test_word_embeddings_are_not_tied(loaded, upstream):
    _, weights = upstream
    model = loaded.model
    assert model.config.tie_word_embeddings is False
    assert model.config.text_config.tie_word_embeddings is False
    head = model.lm_head.weight
    embed = model.model.language_model.embed_tokens.weight
    assert model.get_output_embeddings().weight is head and model.get_input_embeddings().weight is embed
    assert head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    assert not torch.equal(head, embed)
    assert torch.equal(head, weights["language_model.output.weight"])
    assert torch.equal(embed, weights["language_model.model.tok_embeddings.weight"])


# ---------------------------------------------------------------------------------------------
# 6. Native layout


def test_native_layout_loads_directly(loaded, tiny_dir, tmp_path, input_ids):
    native_dir = tmp_path / "native"
    loaded.model.save_pretrained(native_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_dir / name, native_dir / name)
    assert not list(native_dir.glob("*.py"))
    again = load_checkpoint(native_dir, dtype="float32")
    assert again.info.layout == "native"
    assert again.info.image_token_id == loaded.info.image_token_id
    assert again.info.image_tokens_per_tile == loaded.info.image_tokens_per_tile == 256
    assert again.model.config.tie_word_embeddings is False
    assert again.model.config.text_config.tie_word_embeddings is False
    before, after = loaded.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    diff = (_logits(again.model, input_ids) - _logits(loaded.model, input_ids)).abs().max().item()
    assert diff == 0.0


# ---------------------------------------------------------------------------------------------
# 7. Determinism


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tiny_checkpoint_is_deterministic(tiny_dir, tmp_path):
    again = _files(write_tiny_checkpoint(tmp_path / "again", seed=0))
    first = _files(tiny_dir)
    assert {"model.safetensors", "config.json", *TOKENIZER_FILES} <= set(first)
    assert again.keys() == first.keys()
    for name in first:
        assert again[name] == first[name], name

    other = _files(write_tiny_checkpoint(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["tokenizer.model"] != first["tokenizer.model"]


# ---------------------------------------------------------------------------------------------
# 8. The `tokenizers` variant


def test_tokenizers_variant_loads(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "hf", seed=0, tokenizer="tokenizers")
    assert (directory / "tokenizer.json").exists() and not (directory / "tokenizer.model").exists()
    ck = load_checkpoint(directory, dtype="float32")
    tok = ck.tokenizer
    assert tok.kind == "tokenizers"
    assert tok.encode("+", add_bos=False) == [tok.plus_id]
    assert tok.encode("-", add_bos=False) == [tok.minus_id]
    assert tok.plus_id != tok.minus_id
    marker = tok.encode(SCORE_MARKER, add_bos=False)
    assert list(tok.score_marker) == marker
    assert marker[tok.score_offset + 1] == tok.plus_id
    assert marker.count(tok.plus_id) == 1
    # The token before '+' is the last token of the assistant prefix.
    assert marker[: tok.score_offset + 1] == tok.encode(ASSISTANT_ROLE, add_bos=False)
    assert marker[tok.score_offset + 2] == tok.token_to_id("<|im_end|>")
    assert ck.info.image_token_id == tok.token_to_id(IMG_CONTEXT)
    ids = torch.tensor(tok.encode(CONVERSATION))
    assert int(ids.max()) < ck.model.config.text_config.vocab_size
    assert torch.isfinite(_logits(ck.model, ids)).all()


def test_sentencepiece_variant_score_offset(loaded, tiny_dir):
    import sentencepiece as spm

    tok = loaded.tokenizer
    assert tok.kind == "sentencepiece"
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    # The '+' and '-' pieces themselves (sentencepiece's dummy prefix makes a bare "+" encode as "▁+").
    assert sp.id_to_piece(tok.plus_id) == "+" and sp.id_to_piece(tok.minus_id) == "-"
    marker = tok.encode(SCORE_MARKER, add_bos=False)
    assert list(tok.score_marker) == marker and marker.count(tok.plus_id) == 1
    assert marker[tok.score_offset + 1] == tok.plus_id
    assert marker[tok.score_offset + 2] == tok.token_to_id("<|im_end|>")
    assert marker[: tok.score_offset + 1] == tok.encode(ASSISTANT_ROLE, add_bos=False)


# ---------------------------------------------------------------------------------------------
# 9. No checkpoint code is ever imported

_MARKER_MODULE = """\
from pathlib import Path

Path(__file__).with_name(Path(__file__).stem + ".imported").write_text("imported")
raise ImportError("checkpoint code must never be imported")
"""


def test_loader_never_imports_checkpoint_code(tiny_dir, tmp_path):
    directory = _copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    modules = {ref.split(".")[0] for ref in config["auto_map"].values()}
    modules |= {ref.split(".")[0] for ref in tokenizer_config["auto_map"]["AutoTokenizer"] if ref}
    assert {"modeling_internvl_chat", "configuration_internvl_chat", "tokenization_internlm2"} <= modules
    for module in modules:
        (directory / f"{module}.py").write_text(_MARKER_MODULE)

    # The marker modules do work when executed (elsewhere, so no marker lands in the checkpoint).
    probe = tmp_path / "probe" / "modeling_internvl_chat.py"
    probe.parent.mkdir()
    probe.write_text(_MARKER_MODULE)
    with pytest.raises(ImportError):
        runpy.run_path(str(probe))
    assert (probe.parent / "modeling_internvl_chat.imported").exists()

    ck = load_checkpoint(directory, dtype="float32")
    assert ck.info.layout == "upstream"
    assert not list(directory.glob("*.imported"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(template="internvl2_chat"), "template 'internvl2_chat'"),
        (lambda c: c["llm_config"].update(architectures=["Qwen2ForCausalLM"]), "Qwen2ForCausalLM"),
    ],
)
def test_a_checkpoint_it_cannot_score_faithfully_is_refused_by_both_stages(tiny_dir, tmp_path, edit, message):
    from visualprm_ray.model.checkpoint import load_preprocessing

    copy = tmp_path / "foreign"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_preprocessing(copy)  # the CPU stage refuses, not only the scorer
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(copy, dtype="float32", device="cpu")
