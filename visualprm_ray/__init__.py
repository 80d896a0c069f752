"""visualprm-ray: score multimodal reasoning rollouts with the VisualPRM-8B process reward model.

Two products in one package: the PRM itself (:mod:`visualprm_ray.model`, a Python API with no Ray
in it) and the batch job around it (:mod:`visualprm_ray.job`, Ray Data stages over Parquet).
``storage``, ``schema`` and ``errors`` are the low-level pieces both use.

The public surface is small and imported lazily, so ``import visualprm_ray`` (and the CLI's
``--help``) does not pay for torch, transformers or Ray:

    from visualprm_ray import VisualPRM
    prm = VisualPRM.from_pretrained("/models/VisualPRM-8B", device="cuda")
    results = prm.score(question, responses, images=image)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "VisualPRM": "visualprm_ray.model.prm",
    "ScoredResponse": "visualprm_ray.model.prm",
    "tile_image": "visualprm_ray.model.tiling",
    "split_steps": "visualprm_ray.model.prompt",
    "build_conversation": "visualprm_ray.model.prompt",
    "write_tiny_checkpoint": "visualprm_ray.model.tiny_checkpoint",
    "JobConfig": "visualprm_ray.job.config",
    "KernelOptions": "visualprm_ray.model.scoring.options",
}

__all__ = [
    "JobConfig",
    "KernelOptions",
    "ScoredResponse",
    "VisualPRM",
    "build_conversation",
    "split_steps",
    "tile_image",
    "write_tiny_checkpoint",
]

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.model.prm import ScoredResponse, VisualPRM
    from visualprm_ray.model.prompt import build_conversation, split_steps
    from visualprm_ray.model.scoring.options import KernelOptions
    from visualprm_ray.model.tiling import tile_image
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'visualprm_ray' has no attribute {name!r}")
