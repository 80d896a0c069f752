"""VisualPRM as a Python object, with no Ray in it: the notebook and service API (SPEC §7).

:class:`VisualPRM` loads a checkpoint once (:mod:`visualprm_ray.model.checkpoint`), turns a
question, its images and candidate responses into a prepared group (tiling, the exact scored
conversation, tokens; :mod:`visualprm_ray.model.group`) and scores it with the fast scorer
(:mod:`visualprm_ray.model.scoring`): results come back per candidate, in input order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from visualprm_ray.errors import RowError
from visualprm_ray.model.group import ContextPolicy, PreparedGroup, candidate_steps, prepare_group
from visualprm_ray.model.scoring import (
    DEFAULT_TOKEN_BUDGET,
    DEFAULT_VISION_BATCH,
    KernelOptions,
    PrefixMode,
    make_scorer,
)

if TYPE_CHECKING:
    from visualprm_ray.model.checkpoint import LoadedCheckpoint


@dataclass
class ScoredResponse:
    """One candidate's result, in the caller's input order."""

    response: str | list[str]
    steps: list[str]
    step_scores: list[float]
    score: float | None  # mean of step_scores; None when the candidate could not be scored
    score_min: float | None = None
    score_last: float | None = None
    error: str | None = None
    error_kind: str | None = None  # one of visualprm_ray.errors.ERROR_KINDS when error is set
    truncated: bool = False  # only the leading steps that fit the context were scored


class VisualPRM:
    """VisualPRM-8B as a Python object: score a question's candidate responses, step by step.

    >>> prm = VisualPRM.from_pretrained("/path/to/checkpoint", device="cpu", dtype="float32")
    >>> results = prm.score("What is 2+2?", ["2+2 is 4.\\n\\nSo the answer is 4."])  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        vision_batch: int = DEFAULT_VISION_BATCH,
        prefix_mode: PrefixMode = "auto",
        max_tiles: int | None = None,
        max_pixels: int | None = None,
        system_message: str | None = None,
        context_policy: ContextPolicy = "error",
        kernels: KernelOptions | None = None,
    ) -> None:
        """``kernels``: the optional fast paths (:class:`~visualprm_ray.model.scoring.KernelOptions`),
        all off by default; they change how the scores are computed, not the scores."""
        from visualprm_ray.model.images import DEFAULT_MAX_PIXELS

        self.checkpoint = checkpoint
        self.info = checkpoint.info
        self.tokenizer = checkpoint.tokenizer
        self.scorer = make_scorer(
            checkpoint,
            token_budget=token_budget,
            vision_batch=vision_batch,
            mode=prefix_mode,
            options=kernels,
        )
        self.max_tiles = max_tiles or self.info.max_tiles
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.system_message = self.info.system_message if system_message is None else system_message
        self.context_policy: ContextPolicy = context_policy

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        device: str = "cuda",
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa",
        **kwargs: Any,
    ) -> VisualPRM:
        """Load from a local directory (upstream or native layout) or a hub id; never runs its code."""
        from visualprm_ray.model.checkpoint import load_checkpoint
        from visualprm_ray.model.source import resolve_model_source

        directory = resolve_model_source(source)
        checkpoint = load_checkpoint(
            directory, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
        return cls(checkpoint, **kwargs)

    def tile(self, images: Any) -> list[np.ndarray]:
        from visualprm_ray.model.images import load_image
        from visualprm_ray.model.tiling import tile_image

        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [
            tile_image(
                load_image(img, max_pixels=self.max_pixels),
                max_tiles=self.max_tiles,
                tile_size=self.info.image_size,
                use_thumbnail=self.info.use_thumbnail,
                min_tiles=self.info.min_tiles,
            )
            for img in images
        ]

    def prepare(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        *,
        max_steps: int | None = 12,
    ) -> PreparedGroup:
        steps: list[list[str] | RowError] = []
        for r in responses:
            try:
                steps.append(candidate_steps(r, max_steps))
            except RowError as exc:
                steps.append(exc)
        return prepare_group(
            question,
            steps,
            self.tile(images),
            self.tokenizer,
            system_message=self.system_message,
            image_tokens_per_tile=self.info.image_tokens_per_tile,
            image_token_id=self.info.image_token_id,
            max_context=self.info.max_context,
            context_policy=self.context_policy,
        )

    def score(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        max_steps: int | None = 12,
        *,
        on_error: Literal["raise", "record"] = "raise",
    ) -> list[ScoredResponse]:
        """Score every response to ``question``; results come back in input order.

        A response is a string (split into steps as VisualPRM does) or a list of step strings
        (scored as given). ``images`` takes a PIL image, encoded bytes or a path/URI, or a list.
        With ``on_error="record"`` a response that cannot be scored comes back with ``error`` set
        instead of raising.
        """
        group = self.prepare(question, responses, images, max_steps=max_steps)
        if on_error == "raise":
            for err in group.errors:
                if err is not None:
                    raise err
        scores = self.scorer.score([group])[0]
        return [
            _result(r, steps, s, e, cut)
            for r, steps, s, e, cut in zip(
                responses, group.steps, scores, group.errors, group.truncated, strict=True
            )
        ]

    def select_best(
        self,
        question: str,
        responses: Sequence[str | Sequence[str]],
        images: Any = None,
        max_steps: int | None = 12,
    ) -> list[tuple[str | Sequence[str], float]]:
        """``[(response, score), ...]`` best first; ties keep input order (a stable sort)."""
        results = self.score(question, responses, images, max_steps)
        order = sorted(range(len(results)), key=lambda i: -results[i].score)
        return [(responses[i], results[i].score) for i in order]


def _result(
    response, steps, scores: np.ndarray | None, error: RowError | None, truncated: bool = False
) -> ScoredResponse:
    if scores is None:
        if error is None:
            raise AssertionError("a candidate with neither scores nor an error")  # a bug of ours
        return ScoredResponse(response, steps, [], None, error=str(error), error_kind=error.kind)
    values = [float(x) for x in scores]
    return ScoredResponse(
        response,
        steps,
        values,
        float(np.mean(scores, dtype=np.float64)) if values else math.nan,
        score_min=min(values),
        score_last=values[-1],
        truncated=truncated,
    )
