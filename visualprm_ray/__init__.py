"""visualprm-ray: score multimodal reasoning rollouts with the VisualPRM-8B process reward model.

The public surface is small and imported lazily, so ``import visualprm_ray`` (and the CLI's
``--help``) does not pay for torch or transformers:

    from visualprm_ray import VisualPRM
    prm = VisualPRM.from_pretrained("/models/VisualPRM-8B", device="cuda")
    results = prm.score(question, responses, images=image)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "VisualPRM": "visualprm_ray.scorer",
    "ScoredResponse": "visualprm_ray.scorer",
    "tile_image": "visualprm_ray.tiling",
    "split_steps": "visualprm_ray.prompt",
    "build_conversation": "visualprm_ray.prompt",
    "write_tiny_checkpoint": "visualprm_ray.checkpoint",
}

__all__ = [
    "ScoredResponse",
    "VisualPRM",
    "build_conversation",
    "split_steps",
    "tile_image",
    "write_tiny_checkpoint",
]

if TYPE_CHECKING:
    from visualprm_ray.checkpoint import write_tiny_checkpoint
    from visualprm_ray.prompt import build_conversation, split_steps
    from visualprm_ray.scorer import ScoredResponse, VisualPRM
    from visualprm_ray.tiling import tile_image


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'visualprm_ray' has no attribute {name!r}")
