"""Load VisualPRM checkpoints into transformers' native InternVL model, and write tiny ones.

The release uses custom modelling code (``trust_remote_code``). On transformers 5 that path is
silently wrong (rotary buffers left uninitialised on the meta device), and executing checkpoint
code is a security hazard in a batch job anyway. So the original weights are streamed from the
safetensors files and converted in memory to ``InternVLForConditionalGeneration`` with a Llama
text model: InternLM2 is Llama math under other names, plus fused ``wqkv`` (grouped for GQA) and
``qkv`` tensors that are split here. Loading is strict: any missing or unexpected key is an error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from visualprm_ray.model.prompt import DEFAULT_SYSTEM_MESSAGE, IMG_CONTEXT

if TYPE_CHECKING:
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from visualprm_ray.model.tokenizer import Tokenizer

Layout = Literal["upstream", "native"]


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded faithfully (bad layout, missing or unexpected weights)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What scoring needs to know about a checkpoint besides its weights."""

    layout: Layout
    system_message: str
    template: str
    image_size: int
    image_tokens_per_tile: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    max_context: int
    image_token_id: int
    config: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class LoadedCheckpoint:
    model: InternVLForConditionalGeneration
    tokenizer: Tokenizer
    info: CheckpointInfo


# ---------------------------------------------------------------------------------------------
# Config conversion


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json")
    return json.loads(path.read_text())


def detect_layout(config: dict[str, Any]) -> Layout:
    if "llm_config" in config and "vision_config" in config:
        return "upstream"
    if config.get("model_type") == "internvl" and "text_config" in config:
        return "native"
    raise CheckpointError(
        "config.json is neither the upstream InternVL layout (llm_config + vision_config) nor the "
        f"native transformers layout (model_type 'internvl'); got model_type={config.get('model_type')!r}"
    )


# The one conversation template the prompt builder reproduces (prompt.py, SPEC §2.2).
TEMPLATE = "internvl2_5"


def check_scorable(config: dict[str, Any], layout: Layout) -> None:
    """Refuse a checkpoint this project cannot score faithfully, before any weight is read.

    Upstream layout: the language model must be InternLM2 (the converter's source), the template
    ``internvl2_5`` (the conversation the prompt builder writes) and the pixel shuffle v2. Native
    layout: the text model must be Llama-shaped (what InternLM2 converts to); another one (e.g.
    InternVL3's Qwen2) comes with another template. Checked by the CPU stage as well as the scorer:
    both must refuse, or the preparers would build conversations for a model that is not there.
    """
    if layout == "upstream":
        arch = (config["llm_config"].get("architectures") or ["InternLM2ForCausalLM"])[0]
        if arch != "InternLM2ForCausalLM":
            raise CheckpointError(
                f"the language model is {arch}; only InternLM2 (InternVL2.5-8B, VisualPRM-8B) is supported: "
                "another architecture has other weights and another chat template"
            )
        template = config.get("template")
        if template != TEMPLATE:
            raise CheckpointError(
                f"config.json names the conversation template {template!r}; the scorer builds "
                f"{TEMPLATE!r} conversations only (VisualPRM-8B's), and another template's scores would "
                "be silently wrong"
            )
        if config.get("ps_version", "v2") != "v2":
            raise CheckpointError(
                f"pixel shuffle version {config.get('ps_version')!r} is not supported (v2 only)"
            )
    else:
        text_type = config["text_config"].get("model_type", "llama")
        if text_type != "llama":
            raise CheckpointError(
                f"the native checkpoint's text model is {text_type!r}; only the Llama-shaped text model that "
                "InternLM2 converts to is supported (other text models use other chat templates)"
            )


def _tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    side = image_size // patch_size
    return int(side * side * downsample_ratio * downsample_ratio)


def native_config_from_upstream(config: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """Translate an upstream ``config.json`` into an ``InternVLConfig`` (values read, not assumed)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    check_scorable(config, "upstream")
    llm, vis = config["llm_config"], config["vision_config"]
    scaling = llm.get("rope_scaling")
    theta = float(llm.get("rope_theta", 10000.0))
    if scaling:
        rope = {"rope_type": scaling.get("type") or scaling["rope_type"], "factor": float(scaling["factor"])}
    else:
        rope = {"rope_type": "default"}
    rope["rope_theta"] = theta
    text = LlamaConfig(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        hidden_act=llm.get("hidden_act", "silu"),
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=bool(llm.get("bias", False)),
        mlp_bias=False,
        bos_token_id=llm.get("bos_token_id", 1),
        eos_token_id=llm.get("eos_token_id", 2),
        pad_token_id=llm.get("pad_token_id", 2),
        # transformers defaults to tied embeddings; a tied model would overwrite the input
        # embeddings with the output head.
        tie_word_embeddings=False,
    )
    vision = InternVLVisionConfig(
        hidden_size=vis["hidden_size"],
        num_hidden_layers=vis["num_hidden_layers"],
        num_attention_heads=vis["num_attention_heads"],
        intermediate_size=vis["intermediate_size"],
        image_size=vis.get("image_size", config.get("force_image_size", 448)),
        patch_size=vis["patch_size"],
        attention_bias=bool(vis.get("qkv_bias", True)),
        use_qk_norm=bool(vis.get("qk_normalization", False)),
        norm_type=vis.get("norm_type", "layer_norm"),
        layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
        hidden_act=vis.get("hidden_act", "gelu"),
        # Upstream InternViT has no final layernorm: mean-pooling mode keeps an identity there.
        use_mean_pooling=True,
    )
    image_size = vision.image_size[0]
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=_tokens_per_tile(
            image_size, vision.patch_size[0], config.get("downsample_ratio", 0.5)
        ),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=config.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------------------
# Weight conversion

# (pattern on the upstream name, replacement); the first match wins, applied once.
_VISION_RULES = [
    (r"^vision_model\.embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (
        r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$",
        r"embeddings.patch_embeddings.projection.\1",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(\w+)$",
        r"encoder.layer.\1.attention.projection_layer.\2",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(\w+)$", r"encoder.layer.\1.attention.{}_proj.\2"),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(\w+)$",
        r"encoder.layer.\1.attention.\2.\3",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.(\w+)$", r"encoder.layer.\1.layernorm_before.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.(\w+)$", r"encoder.layer.\1.layernorm_after.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(\w+)$", r"encoder.layer.\1.mlp.\2.\3"),
]
_PROJECTOR_RULES = [
    (r"^mlp1\.0\.(\w+)$", r"layer_norm.\1"),
    (r"^mlp1\.1\.(\w+)$", r"linear_1.\1"),
    (r"^mlp1\.3\.(\w+)$", r"linear_2.\1"),
]
_LANGUAGE_RULES = [
    (r"^language_model\.model\.tok_embeddings\.weight$", "embed_tokens.weight"),
    (r"^language_model\.model\.norm\.weight$", "norm.weight"),
    (r"^language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(\w+)$", r"layers.\1.self_attn.{}_proj.\2"),
    (r"^language_model\.model\.layers\.(\d+)\.attention\.wo\.(\w+)$", r"layers.\1.self_attn.o_proj.\2"),
    (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.(\w+)$", r"layers.\1.mlp.gate_proj.\2"),
    (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.(\w+)$", r"layers.\1.mlp.down_proj.\2"),
    (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.(\w+)$", r"layers.\1.mlp.up_proj.\2"),
    (r"^language_model\.model\.layers\.(\d+)\.attention_norm\.weight$", r"layers.\1.input_layernorm.weight"),
    (
        r"^language_model\.model\.layers\.(\d+)\.ffn_norm\.weight$",
        r"layers.\1.post_attention_layernorm.weight",
    ),
]
_FAMILIES = [
    ("model.vision_tower.", [(re.compile(p), r) for p, r in _VISION_RULES]),
    ("model.multi_modal_projector.", [(re.compile(p), r) for p, r in _PROJECTOR_RULES]),
    ("model.language_model.", [(re.compile(p), r) for p, r in _LANGUAGE_RULES]),
]


@dataclass(frozen=True)
class _SplitShapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def convert_tensor(name: str, tensor: torch.Tensor, shapes: _SplitShapes) -> list[tuple[str, torch.Tensor]]:
    """Map one upstream tensor to its native name(s); fused q/k/v tensors become three."""
    if name == "language_model.output.weight":
        return [("lm_head.weight", tensor)]
    for prefix, rules in _FAMILIES:
        for pattern, replacement in rules:
            if not pattern.match(name):
                continue
            target = prefix + pattern.sub(replacement, name)
            if "{}" not in target:
                return [(target, tensor)]
            if ".attn.qkv." in name:
                # InternViT: plain concatenation [q; k; v] along the output rows.
                if tensor.shape[0] % 3:
                    raise CheckpointError(f"{name!r} has {tensor.shape[0]} rows, not a multiple of 3")
                q, k, v = tensor.chunk(3, dim=0)
            else:
                q, k, v = _split_grouped_wqkv(name, tensor, shapes)
            return [(target.format(part), t.contiguous()) for part, t in zip("qkv", (q, k, v), strict=True)]
    raise CheckpointError(f"unexpected weight {name!r} in an upstream checkpoint")


def upstream_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an upstream checkpoint with this ``config.json``, name -> shape, derived
    from the config's sizes alone (the layout of SPEC §2.5; what the tiny checkpoints are drawn
    from, and what the real InternVL2.5-8B index is checked against)."""
    vis, llm = config["vision_config"], config["llm_config"]
    vh, vi, patch = _size(vis["hidden_size"]), _size(vis["intermediate_size"]), _size(vis["patch_size"])
    image = _size(vis.get("image_size", config.get("force_image_size", 448)))
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, vh),
        "vision_model.embeddings.patch_embedding.weight": (vh, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (vh,),
        "vision_model.embeddings.position_embedding": (1, (image // patch) ** 2 + 1, vh),
    }
    for i in range(vis["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        shapes |= {
            p + "attn.qkv.weight": (3 * vh, vh),
            **({p + "attn.qkv.bias": (3 * vh,)} if vis.get("qkv_bias", True) else {}),
            p + "attn.proj.weight": (vh, vh),
            p + "attn.proj.bias": (vh,),
            p + "ls1": (vh,),
            p + "ls2": (vh,),
            p + "norm1.weight": (vh,),
            p + "norm1.bias": (vh,),
            p + "norm2.weight": (vh,),
            p + "norm2.bias": (vh,),
            p + "mlp.fc1.weight": (vi, vh),
            p + "mlp.fc1.bias": (vi,),
            p + "mlp.fc2.weight": (vh, vi),
            p + "mlp.fc2.bias": (vh,),
        }
    lh, li, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    ratio = config.get("downsample_ratio", 0.5)
    proj_in = int(vh / (ratio * ratio))  # pixel shuffle stacks 1/ratio**2 patches' features
    shapes |= {
        "mlp1.0.weight": (proj_in,),
        "mlp1.0.bias": (proj_in,),
        "mlp1.1.weight": (lh, proj_in),
        "mlp1.1.bias": (lh,),
        "mlp1.3.weight": (lh, lh),
        "mlp1.3.bias": (lh,),
        "language_model.model.tok_embeddings.weight": (vocab, lh),
        "language_model.model.norm.weight": (lh,),
        "language_model.output.weight": (vocab, lh),
    }
    heads = llm["num_attention_heads"]
    kv, head_dim = llm.get("num_key_value_heads", heads), lh // heads
    bias = bool(llm.get("bias", False))
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        shapes |= {
            p + "attention.wqkv.weight": ((heads + 2 * kv) * head_dim, lh),
            **({p + "attention.wqkv.bias": ((heads + 2 * kv) * head_dim,)} if bias else {}),
            p + "attention.wo.weight": (lh, heads * head_dim),
            **({p + "attention.wo.bias": (lh,)} if bias else {}),
            p + "feed_forward.w1.weight": (li, lh),
            p + "feed_forward.w2.weight": (lh, li),
            p + "feed_forward.w3.weight": (li, lh),
            p + "attention_norm.weight": (lh,),
            p + "ffn_norm.weight": (lh,),
        }
    return shapes


def split_shapes(native: InternVLConfig) -> _SplitShapes:
    """How the fused q/k/v tensors of a checkpoint for ``native`` split."""
    text = native.text_config
    return _SplitShapes(
        text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    )


def _split_grouped_wqkv(name: str, tensor: torch.Tensor, s: _SplitShapes) -> tuple[torch.Tensor, ...]:
    # InternLM2 packs, per key/value head, its G query heads, then the key head, then the value head.
    groups = s.num_heads // s.num_kv_heads
    rows = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    if tensor.shape[0] != rows:
        raise CheckpointError(f"{name!r} has {tensor.shape[0]} rows where the config implies {rows}")
    rest = tensor.shape[1:]  # (hidden,) for weights, () for biases
    grouped = tensor.reshape(s.num_kv_heads, groups + 2, s.head_dim, *rest)
    q = grouped[:, :groups].reshape(s.num_heads * s.head_dim, *rest)
    k = grouped[:, -2].reshape(s.num_kv_heads * s.head_dim, *rest)
    v = grouped[:, -1].reshape(s.num_kv_heads * s.head_dim, *rest)
    return q, k, v


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    return files


def iter_upstream_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, f.get_tensor(name)


def parameter_count(read_range: Callable[[str, int, int], bytes], files: list[str]) -> int:
    """Weights in safetensors ``files``, from their headers alone.

    ``read_range(path, start, end)`` returns those bytes of a file, so a remote checkpoint costs
    two small range reads per file instead of a download.
    """
    total = 0
    for path in files:
        header_len = int.from_bytes(read_range(path, 0, 8), "little")
        header = json.loads(read_range(path, 8, 8 + header_len))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


# ---------------------------------------------------------------------------------------------
# Loading


def _size(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def read_info(config: dict[str, Any], tokenizer: Tokenizer) -> CheckpointInfo:
    """What the CPU side needs to know, from config.json alone (no torch, no transformers).

    The preparation actors tokenize and tile without ever loading weights, so this must not depend
    on the model classes; :func:`load_checkpoint` cross-checks it against the built model.
    """
    layout = detect_layout(config)
    check_scorable(config, layout)
    image_token_id = tokenizer.token_to_id(IMG_CONTEXT)
    if layout == "upstream":
        vision, text = config["vision_config"], config["llm_config"]
        image_size = _size(vision.get("image_size", config.get("force_image_size", 448)))
        per_tile = _tokens_per_tile(
            image_size, _size(vision["patch_size"]), config.get("downsample_ratio", 0.5)
        )
    else:
        vision, text = config["vision_config"], config["text_config"]
        image_size = _size(vision.get("image_size", 448))
        per_tile = int(config.get("image_seq_length", 256))
        if config.get("image_token_id", image_token_id) != image_token_id:
            raise CheckpointError(
                f"config image_token_id {config.get('image_token_id')} != tokenizer id of {IMG_CONTEXT}"
            )
    return CheckpointInfo(
        layout=layout,
        system_message=config.get("system_message") or DEFAULT_SYSTEM_MESSAGE,
        template=config.get("template", TEMPLATE),
        image_size=image_size,
        image_tokens_per_tile=per_tile,
        min_tiles=config.get("min_dynamic_patch", 1),
        max_tiles=config.get("max_dynamic_patch", 12),
        use_thumbnail=config.get("use_thumbnail", True),
        max_context=int(text.get("max_position_embeddings", 32768)),
        image_token_id=image_token_id,
        config=config,
    )


def load_preprocessing(
    directory: str | Path, tokenizer_kind: Literal["auto", "sentencepiece", "tokenizers"] = "auto"
) -> tuple[Tokenizer, CheckpointInfo]:
    """Tokenizer and checkpoint facts for the CPU stage, without loading any weights."""
    from visualprm_ray.model.tokenizer import load_tokenizer

    directory = Path(directory)
    tokenizer = load_tokenizer(directory, tokenizer_kind)
    return tokenizer, read_info(read_config(directory), tokenizer)


def build_model(config: InternVLConfig, *, dtype: torch.dtype, device: str, attn_implementation: str):
    """An ``InternVLForConditionalGeneration`` with real (computed) buffers, weights to be filled.

    The model is built directly on the target device rather than on ``meta``: building on meta is
    what leaves non-persistent buffers (rotary frequencies) uninitialised in the upstream path.
    """
    import torch
    from transformers import InternVLForConditionalGeneration

    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.eval().requires_grad_(False)
    lm_head = model.get_output_embeddings().weight
    if lm_head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise CheckpointError("the built model ties its input embeddings to the output head")
    return model


def _load_upstream(directory: Path, config: dict, tokenizer: Tokenizer, dtype, device, attn_implementation):
    import torch

    native = native_config_from_upstream(config, image_token_id=tokenizer.token_to_id(IMG_CONTEXT))
    model = build_model(native, dtype=dtype, device=device, attn_implementation=attn_implementation)
    shapes = split_shapes(native)
    params = dict(model.state_dict())
    seen: set[str] = set()
    with torch.no_grad():
        for name, tensor in iter_upstream_tensors(directory):
            for target, value in convert_tensor(name, tensor, shapes):
                dest = params.get(target)
                if dest is None:
                    raise CheckpointError(f"{name!r} converts to {target!r}, which the native model lacks")
                if tuple(dest.shape) != tuple(value.shape):
                    raise CheckpointError(
                        f"{name!r} -> {target!r}: shape {tuple(value.shape)} != expected {tuple(dest.shape)}"
                    )
                if target in seen:
                    raise CheckpointError(f"{target!r} is written twice by the checkpoint")
                dest.copy_(value.to(dtype))
                seen.add(target)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"checkpoint misses {len(missing)} weight(s), e.g. {missing[:5]}")
    return model, native


def _load_native(directory: Path, dtype, device, attn_implementation):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    native = InternVLConfig.from_pretrained(directory)
    native.tie_word_embeddings = False
    native.text_config.tie_word_embeddings = False
    # No device_map: that would need accelerate for a plain single-device load.
    model, loading = InternVLForConditionalGeneration.from_pretrained(
        directory,
        config=native,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    model.to(device)
    bad = {
        k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if bad:
        raise CheckpointError(f"native checkpoint does not load strictly: {bad}")
    model.eval().requires_grad_(False)
    return model, native


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_checkpoint(
    directory: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    tokenizer_kind: Literal["auto", "sentencepiece", "tokenizers"] = "auto",
) -> LoadedCheckpoint:
    """Load a local checkpoint directory, upstream or native layout, without running its code."""
    directory = Path(directory)
    tokenizer, info = load_preprocessing(directory, tokenizer_kind)
    torch_dtype = resolve_dtype(dtype)
    if info.layout == "upstream":
        model, native = _load_upstream(
            directory, info.config, tokenizer, torch_dtype, device, attn_implementation
        )
    else:
        model, native = _load_native(directory, torch_dtype, device, attn_implementation)
    if (native.image_seq_length, native.image_token_id) != (info.image_tokens_per_tile, info.image_token_id):
        raise CheckpointError(
            f"image tokens per tile / image token id disagree between config.json ({info.image_tokens_per_tile}, "
            f"{info.image_token_id}) and the built model ({native.image_seq_length}, {native.image_token_id})"
        )
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, info=info)
