"""What the Ray job's scores are checked against: the in-process PRM, the plain way."""

from __future__ import annotations

from visualprm_ray.model.prm import VisualPRM


def in_process_step_scores(model_dir, groups: list[dict]) -> dict[tuple[str, int], list[float]]:
    """``(group id, candidate index) -> step scores`` of every candidate, scored in this process."""
    prm = VisualPRM.from_pretrained(model_dir, device="cpu", dtype="float32")
    return {
        (g["id"], k): r.step_scores
        for g in groups
        for k, r in enumerate(prm.score(g["question"], g["responses"], images=[g["image"]]))
    }
