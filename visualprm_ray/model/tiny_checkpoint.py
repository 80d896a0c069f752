"""Tiny random VisualPRM checkpoints in the upstream layout (SPEC §2.6).

Nothing can be downloaded where tests and demos run, yet the loading path (upstream config,
upstream weight names, fused ``wqkv``/``qkv``, sentencepiece tokenizer with added tokens) must be
exercised end to end. So this writes a checkpoint that differs from VisualPRM-8B only in its sizes
and in being random: the vision tower keeps 448-px images and 14-px patches (so a tile really is 256
image tokens), and the language model uses grouped-query attention so the grouped ``wqkv`` split is
tested.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Literal

# Upstream order of the tokens added after the sentencepiece vocabulary.
ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# Upstream keeps these inside the sentencepiece vocabulary (user-defined pieces).
CHAT_TOKENS = ["<|im_end|>", "<|im_start|>"]

TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LLM = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
SP_VOCAB_SIZE = 640
# VisualPRM-8B's sizes (InternVL2.5-8B: InternViT-300M and InternLM2-7B, SPEC §2.5): the real
# shapes for the GPU benchmark and for checking the converter against the real weight index.
VISUALPRM_8B_LLM = {
    "vocab_size": 92553,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
VISUALPRM_8B_VISION = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}

_WORDS = [
    "the",
    "triangle",
    "angle",
    "side",
    "length",
    "area",
    "circle",
    "radius",
    "diameter",
    "square",
    "rectangle",
    "point",
    "line",
    "segment",
    "parallel",
    "perpendicular",
    "equal",
    "sum",
    "of",
    "is",
    "are",
    "so",
    "we",
    "have",
    "therefore",
    "then",
    "step",
    "answer",
    "question",
    "image",
    "shows",
    "given",
    "find",
    "compute",
    "value",
    "total",
    "each",
    "because",
    "since",
    "thus",
    "result",
    "correct",
    "final",
    "solution",
    "process",
    "first",
    "second",
    "next",
    "let",
    "use",
    "formula",
    "theorem",
    "pythagorean",
    "right",
    "hypotenuse",
    "degrees",
    "units",
    "cm",
    "height",
    "base",
    "half",
    "times",
    "plus",
    "minus",
    "divided",
    "by",
    "x",
    "y",
    "z",
    "a",
    "b",
    "c",
    "AB",
    "BC",
    "CA",
    "ABC",
    "O",
    "P",
    "Q",
]


def _corpus(rng: random.Random, lines: int = 1500) -> list[str]:
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        nums = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3))]
        ops = [rng.choice(["+", "-", "=", "*", "/", "(", ")", ".", ",", ":", "#", "\\boxed{", "}"])]
        tokens = words + nums + ops
        rng.shuffle(tokens)
        out.append(" ".join(tokens))
    out.append("### Question:\n### Solution Process:\nStep 1: + - = Final answer: \\boxed{42}")
    out.append("assistant user system")
    return out


def _train_sentencepiece(seed: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(seed))),
        model_writer=model,
        vocab_size=SP_VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # any text (the Chinese system message too) encodes without <unk>
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # "\n\n" separates steps; it must survive
        split_digits=True,
        user_defined_symbols=CHAT_TOKENS,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _sentencepiece_tokenizer(seed: int) -> tuple[dict[str, bytes | str], dict[str, int], int]:
    """``tokenizer.model`` (the release's form): chat tokens inside the vocabulary, the rest after it."""
    import sentencepiece as spm

    model = _train_sentencepiece(seed)
    sp = spm.SentencePieceProcessor(model_proto=model)
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2} | {t: sp.piece_to_id(t) for t in CHAT_TOKENS}
    specials |= {tok: SP_VOCAB_SIZE + i for i, tok in enumerate(ADDED_TOKENS)}
    return {"tokenizer.model": model}, specials, SP_VOCAB_SIZE + len(ADDED_TOKENS)


def _tokenizers_tokenizer(seed: int) -> tuple[dict[str, bytes | str], dict[str, int], int]:
    """A byte-level BPE ``tokenizer.json``, for the checkpoints that ship one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["<unk>", "<s>", "</s>", *CHAT_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=SP_VOCAB_SIZE,
        special_tokens=base,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    tok.add_special_tokens(ADDED_TOKENS)
    specials = {t: tok.token_to_id(t) for t in base + ADDED_TOKENS}
    return {"tokenizer.json": tok.to_str()}, specials, tok.get_vocab_size()


def upstream_config(*, llm: dict, vision: dict, system_message: str | None = None) -> dict:
    """An upstream-layout ``config.json`` (VisualPRM-8B's values) with the given model sizes.

    ``llm`` holds the InternLM2 sizes (vocab_size, hidden_size, ...), ``vision`` the InternViT ones.
    Used for the tiny checkpoints and by ``benchmarks/gpu_scorer.py`` for the real 8B shapes.
    """
    config = {
        "architectures": ["InternVLChatModel"],
        # Kept to mirror the release: the loader must never import what auto_map names.
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "torch_dtype": "float32",
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "bias": False,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
            **llm,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "image_size": 448,
            "patch_size": 14,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            **vision,
        },
    }
    if system_message is not None:
        config["system_message"] = system_message
    return config


def _init(name: str) -> tuple[float, float]:
    """(scale, centre) of a tensor's random values: norms and layer scales away from 1 and 0 so
    that a swapped or dropped tensor changes the logits; embeddings large enough to matter."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return 0.05, 0.0
    if name.endswith(("ls1", "ls2")):
        return 0.2, 0.5
    if "norm" in leaf[-2] or name == "mlp1.0.weight":
        return 0.2, 1.0
    if name.endswith(("class_embedding", "position_embedding")):
        return 0.5, 0.0
    if name.endswith("patch_embedding.weight"):
        return 0.05, 0.0
    if name.endswith("tok_embeddings.weight"):
        return 1.0, 0.0
    if name.startswith("language_model."):
        return 0.15, 0.0
    return 0.2, 0.0


def _random_upstream_weights(config: dict, seed: int) -> dict:
    """Random tensors under the upstream names and shapes (:func:`upstream_weight_shapes`)."""
    import torch

    from visualprm_ray.model.checkpoint import upstream_weight_shapes

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in upstream_weight_shapes(config).items():
        scale, center = _init(name)
        weights[name] = (center + scale * torch.randn(*shape, generator=g)).float()
    return weights


def write_tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    *,
    tokenizer: Literal["sentencepiece", "tokenizers"] = "sentencepiece",
    system_message: str | None = None,
) -> Path:
    """Write a tiny, randomly initialised VisualPRM checkpoint in the upstream layout to ``path``.

    ``tokenizer="sentencepiece"`` writes ``tokenizer.model`` (the release's form);
    ``"tokenizers"`` writes a ``tokenizer.json`` instead, for the other supported path.
    Returns the directory. Deterministic for a given seed.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    make = _sentencepiece_tokenizer if tokenizer == "sentencepiece" else _tokenizers_tokenizer
    files, specials, vocab_size = make(seed)
    for name, content in files.items():
        target = out / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    config = upstream_config(
        llm={**TINY_LLM, "vocab_size": vocab_size}, vision=TINY_VISION, system_message=system_message
    )
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "special": True}
    added_decoder = {
        str(i): {"content": c, **flags} for c, i in sorted(specials.items(), key=lambda kv: kv[1])
    }
    tokenizer_config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_decoder,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    added = {t: specials[t] for t in ADDED_TOKENS}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [specials["</s>"], *(specials[t] for t in CHAT_TOKENS)]}, indent=2)
    )
    save_file(
        _random_upstream_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out
