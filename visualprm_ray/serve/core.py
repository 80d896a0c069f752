"""What one model replica of the endpoint does, without Ray Serve or HTTP in it.

A request is validated (:class:`ScoreRequest`), its images resolved under the server's rules
(:func:`image_bytes_or_uri`), then prepared exactly as the job and :class:`~visualprm_ray.VisualPRM`
prepare a group (tiling, the scored conversation, tokens), so its scores are
:meth:`VisualPRM.score`'s. What is wrong with the request's *data* (an undecodable image, a
conversation over the context, a forged marker) becomes a per-candidate ``error``/``error_kind``
from the job's closed set (:mod:`visualprm_ray.errors`); a request the server cannot read at all
is :class:`BadRequest` (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from visualprm_ray.errors import ImageError, RowError

if TYPE_CHECKING:
    from visualprm_ray.model.group import PreparedGroup
    from visualprm_ray.serve.config import ServeConfig

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")


class BadRequest(ValueError):
    """A request that is not a valid scoring request (HTTP 400); the message says why."""


class ScoreRequest(BaseModel):
    """One group: a question, its candidate responses, and the images they are about."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1, description="The question the responses answer.")
    responses: list[str | list[str]] = Field(
        ...,
        min_length=1,
        description="Candidate responses: a string is split into steps at blank lines as VisualPRM does (at most scoring.max_steps); a list of strings is scored as those steps.",
    )
    images: list[str] = Field(
        default_factory=list,
        description="Images, in the order their <image> placeholders appear (or all before the question): base64-encoded bytes (optionally as a data: URL), an s3:// or gs:// URI the server's storage settings can read, or a path under the server's image_root.",
    )


class CandidateResult(BaseModel):
    """One candidate's scores, in the request's order."""

    step_scores: list[float] = Field(description="P(+) of every scored step, in order.")
    score: float | None = Field(description="Mean of the step scores; null for a candidate with an error.")
    score_min: float | None = Field(description="Lowest step score.")
    score_last: float | None = Field(description="Last step's score.")
    rank: int | None = Field(
        description="0 for the best score of the request, ties in input order; null with an error."
    )
    is_best: bool = Field(description="True for exactly one scored candidate: rank 0.")
    num_steps: int | None = Field(
        description="Steps scored (after merging; fewer with context_policy truncate)."
    )
    truncated: bool = Field(False, description="Only the leading steps that fit the context were scored.")
    error: str | None = Field(None, description="What was wrong with this candidate's data.")
    error_kind: str | None = Field(
        None, description="One of the job's error kinds (docs: visualprm_ray.errors)."
    )


class ScoreResponse(BaseModel):
    """The answer to POST /v1/score."""

    model: str = Field(description="The model's content digest (the same as a batch job's manifest records).")
    results: list[CandidateResult]


def parse_request(body: bytes, *, max_candidates: int, max_images: int) -> ScoreRequest:
    """A validated request from a JSON body, or :class:`BadRequest` naming what is wrong."""
    import json

    from pydantic import ValidationError

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    try:
        request = ScoreRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BadRequest(f"not a scoring request: {problems}") from None
    if len(request.responses) > max_candidates:
        raise BadRequest(f"{len(request.responses)} responses, over the server's limit of {max_candidates}")
    if len(request.images) > max_images:
        raise BadRequest(f"{len(request.images)} images, over the server's limit of {max_images}")
    return request


def image_bytes_or_uri(text: str, *, image_root: str | None) -> bytes | str:
    """What an image string refers to: decoded bytes, or a URI/path the server may read.

    ``data:...;base64,`` and strict base64 are bytes; ``s3://``/``gs://`` URIs are read with the
    storage settings; a local path (or ``file://``) only when it lies under ``image_root`` once
    symbolic links and ``..`` are resolved. Anything else is refused as an :class:`ImageError`.
    """
    if text.startswith("data:"):
        _, _, payload = text.partition("base64,")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URL is not base64", kind="image_undecodable") from None
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme in OBJECT_STORE_SCHEMES:
            return text
        if scheme != "file":
            raise ImageError(
                f"{scheme}:// images are not read by this server: send base64 bytes, an s3:// or gs:// URI, "
                "or a path under its image_root",
                kind="image_unsupported",
            )
        text = text[len("file://") :]
    else:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass  # not base64: a local path
    if image_root is None:
        raise ImageError(
            "local image paths are not read by this server (it has no image_root): send the bytes as base64",
            kind="image_unsupported",
        )
    root = os.path.realpath(image_root)
    path = os.path.realpath(os.path.join(root, text))
    if os.path.commonpath([root, path]) != root:
        raise ImageError("the image path lies outside the server's image_root", kind="image_unsupported")
    return path


@dataclass
class Prepared:
    """A request made ready for the scorer: its group, or the error every candidate gets."""

    group: PreparedGroup | None
    error: RowError | None
    num_candidates: int

    @property
    def tokens(self) -> int:
        """What the group costs the scorer: its prefix and every candidate's suffix."""
        if self.group is None:
            return 0
        return len(self.group.prefix) + sum(len(s) for s in self.group.suffixes)

    @property
    def needs_scoring(self) -> bool:
        return self.group is not None and any(e is None for e in self.group.errors)


class ReplicaScorer:
    """One model replica: loads the checkpoint once, prepares requests and scores batches of them."""

    def __init__(self, config: ServeConfig, device: str) -> None:
        from visualprm_ray.model.checkpoint import load_checkpoint
        from visualprm_ray.model.scoring import make_scorer
        from visualprm_ray.model.source import model_identity, resolve_model_source

        self.config = config
        model = config.model
        directory = resolve_model_source(model.source, storage=config.storage, cache_dir=model.cache_dir)
        self.model_id = model_identity(directory, cache_dir=model.cache_dir).digest
        self.checkpoint = load_checkpoint(
            directory,
            dtype=model.dtype,
            device=device,
            attn_implementation=model.attn_implementation,
            tokenizer_kind=model.tokenizer,
        )
        self.info = self.checkpoint.info
        scoring = config.scoring
        self.scorer = make_scorer(
            self.checkpoint,
            token_budget=scoring.token_budget,
            vision_batch=scoring.vision_batch,
            mode=scoring.prefix_mode,
            options=scoring.kernels.options(),
        )
        self.system_message = (
            model.system_message if model.system_message is not None else self.info.system_message
        )
        self.max_context = scoring.max_context or self.info.max_context

    def prepare(self, request: ScoreRequest) -> Prepared:
        """The request's group (thread-safe: no model state is touched)."""
        from visualprm_ray.model.group import candidate_steps, prepare_group

        n = len(request.responses)
        try:
            tiles = [self._tiles(text) for text in request.images]
            steps: list[list[str] | RowError] = []
            for response in request.responses:
                try:
                    if isinstance(response, list):
                        steps.append(candidate_steps(response, None))  # pre-split: scored as given
                    else:
                        steps.append(candidate_steps(response, self.config.scoring.max_steps))
                except RowError as exc:
                    steps.append(exc)
            group = prepare_group(
                request.question,
                steps,
                tiles,
                self.checkpoint.tokenizer,
                system_message=self.system_message,
                image_tokens_per_tile=self.info.image_tokens_per_tile,
                image_token_id=self.info.image_token_id,
                max_context=self.max_context,
                context_policy=self.config.scoring.context_policy,
            )
        except RowError as exc:  # the whole group: an image, the question, the placeholders
            return Prepared(None, exc, n)
        return Prepared(group, None, n)

    def _tiles(self, text: str) -> np.ndarray:
        from visualprm_ray.model.images import load_image
        from visualprm_ray.model.tiling import tile_image

        images = self.config.images
        value = image_bytes_or_uri(text, image_root=self.config.server.image_root)
        image = load_image(
            value, max_pixels=images.max_pixels, max_bytes=images.max_bytes, options=self.config.storage
        )
        return tile_image(
            image,
            max_tiles=images.max_tiles or self.info.max_tiles,
            tile_size=self.info.image_size,
            use_thumbnail=self.info.use_thumbnail,
            min_tiles=self.info.min_tiles,
        )

    def score(self, batch: list[Prepared]) -> list[list[np.ndarray | None]]:
        """Step scores of every candidate of every request in ``batch``: one scorer call, so the
        requests share vision forwards; each group keeps its own prefix sharing and chunks."""
        if any(p.group is None for p in batch):
            raise AssertionError("only prepared groups are scored")  # a bug of ours
        return self.scorer.score([p.group for p in batch])

    def response(self, prepared: Prepared, scores: list[np.ndarray | None] | None) -> ScoreResponse:
        return ScoreResponse(model=self.model_id, results=results(prepared, scores))


def results(prepared: Prepared, scores: list[np.ndarray | None] | None) -> list[CandidateResult]:
    """Per-candidate results with the batch job's aggregates (mean, min, last, rank, best)."""
    from visualprm_ray.job import stages as col
    from visualprm_ray.job.stages.aggregate import aggregate_group

    n = prepared.num_candidates
    group = prepared.group
    errors: list[RowError | None] = [prepared.error] * n if group is None else list(group.errors)
    scores = scores if scores is not None else [None] * n
    steps = [None if s is None else [float(x) for x in s] for s in scores]
    agg = aggregate_group(steps)
    out = []
    for k in range(n):
        error = errors[k]
        if steps[k] is None and error is None:
            raise AssertionError("a candidate with neither scores nor an error")  # a bug of ours
        out.append(
            CandidateResult(
                step_scores=steps[k] or [],
                score=agg[col.SCORE][k],
                score_min=agg[col.SCORE_MIN][k],
                score_last=agg[col.SCORE_LAST][k],
                rank=agg[col.RANK][k],
                is_best=agg[col.IS_BEST][k],
                num_steps=None if steps[k] is None else len(steps[k]),
                truncated=bool(group.truncated[k]) if group is not None and steps[k] is not None else False,
                error=None if error is None else str(error),
                error_kind=None if error is None else error.kind,
            )
        )
    return out
