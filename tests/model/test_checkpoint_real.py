"""The converter against the real InternVL2.5-8B weight layout (``../shared/real-internlm2``):
every one of the 573 real tensor names maps onto the native model built from the real config
values, strictly, on the meta device (no weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from real_artifacts import real

from visualprm_ray.model.checkpoint import (
    CheckpointError,
    check_scorable,
    convert_tensor,
    native_config_from_upstream,
    split_shapes,
    upstream_weight_shapes,
)
from visualprm_ray.model.tiny_checkpoint import VISUALPRM_8B_LLM, VISUALPRM_8B_VISION, upstream_config

IMG_CONTEXT_ID = 92546  # reference_facts.json's added-token table


@pytest.fixture(scope="module")
def index() -> dict:
    return json.loads(real("model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return upstream_config(llm=VISUALPRM_8B_LLM, vision=VISUALPRM_8B_VISION)


def test_the_shapes_derived_from_the_config_are_the_real_checkpoints(index, config):
    shapes = upstream_weight_shapes(config)
    assert sorted(shapes) == sorted(index["weight_map"])  # the same 573 names, none more, none less
    assert len(shapes) == 573
    # bf16: two bytes a value; the index's total_size is the real shards' tensor bytes.
    assert 2 * sum(math.prod(s) for s in shapes.values()) == index["metadata"]["total_size"]


def test_every_real_name_maps_onto_the_native_model_strictly(index, config):
    from transformers import InternVLForConditionalGeneration

    native = native_config_from_upstream(config, image_token_id=IMG_CONTEXT_ID)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(native, dtype=torch.bfloat16)
    params = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert all(t.is_meta for t in model.state_dict().values())  # no weights were allocated
    shapes = upstream_weight_shapes(config)
    targets: dict[str, str] = {}
    for name in index["weight_map"]:
        source = torch.empty(shapes[name], dtype=torch.bfloat16, device="meta")
        for target, tensor in convert_tensor(name, source, split_shapes(native)):
            assert target not in targets, f"{name} and {targets.get(target)} both write {target}"
            assert target in params, f"{name} -> {target}, which the native model lacks"
            assert tuple(tensor.shape) == params[target], (name, target)
            targets[target] = name
    assert sorted(set(params) - set(targets)) == []  # nothing missing
    # 24 fused InternViT qkv (weight and bias) and 32 grouped wqkv became three tensors each.
    assert len(targets) == 573 + 2 * (24 * 2 + 32)


def test_a_foreign_template_or_language_model_is_refused(config):
    check_scorable(config, "upstream")  # VisualPRM-8B's own: fine
    with pytest.raises(CheckpointError, match="template 'internlm2-chat'"):
        check_scorable({**config, "template": "internlm2-chat"}, "upstream")
    with pytest.raises(CheckpointError, match="template None"):
        check_scorable({k: v for k, v in config.items() if k != "template"}, "upstream")
    qwen = {**config, "llm_config": {**config["llm_config"], "architectures": ["Qwen2ForCausalLM"]}}
    with pytest.raises(CheckpointError, match="Qwen2ForCausalLM"):
        check_scorable(qwen, "upstream")
    with pytest.raises(CheckpointError, match="'qwen2'"):
        check_scorable({"model_type": "internvl", "text_config": {"model_type": "qwen2"}}, "native")
    check_scorable({"model_type": "internvl", "text_config": {"model_type": "llama"}}, "native")
