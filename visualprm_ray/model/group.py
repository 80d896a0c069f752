"""A group of candidates (one question, its images, N responses) made ready for the scoring device.

This is the CPU half of scoring: render each candidate's conversation, tokenize it, find its score
positions, and split the token sequences into the group's longest common prefix plus one suffix per
candidate. It holds numpy arrays only (no torch), so the Ray preparation actors can build it and
ship it to the scoring actors as plain columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from visualprm_ray.errors import ContextLengthError, RowError
from visualprm_ray.model.prompt import conversation_head, conversation_tail, render_question, split_steps
from visualprm_ray.model.tokenizer import Tokenizer, encode_shared_head, find_score_positions

ContextPolicy = Literal["error", "truncate"]


@dataclass
class PreparedGroup:
    """Token ids of a group, split into a shared prefix and per-candidate suffixes.

    ``positions[k]`` are indices into candidate k's full sequence (prefix + suffix k) where its
    step scores are read; ``tiles`` are the group's images' tiles in order, uint8 NHWC.
    """

    prefix: np.ndarray  # int64 [P]
    suffixes: list[np.ndarray]  # int64 [S_k]
    positions: list[np.ndarray]  # int64 [num_steps_k]
    tiles: np.ndarray  # uint8 [T, 448, 448, 3]; T may be 0
    steps: list[list[str]]
    errors: list[RowError | None]  # per candidate; None when it is scored
    # Per candidate: only the first steps were kept because the whole conversation was over the
    # context (context_policy "truncate"); ``steps[k]`` then holds the kept steps.
    truncated: list[bool] = field(default_factory=list)

    def scorable(self, k: int) -> bool:
        return self.errors[k] is None

    @property
    def num_candidates(self) -> int:
        return len(self.suffixes)

    def sequence_length(self, k: int) -> int:
        return len(self.prefix) + len(self.suffixes[k])

    def full_sequence(self, k: int) -> np.ndarray:
        return np.concatenate([self.prefix, self.suffixes[k]])


def candidate_steps(response: str | Sequence[str], max_steps: int | None) -> list[str]:
    """Steps of one candidate: a string is split (SPEC §2.1), a list of strings is taken as given."""
    if isinstance(response, str):
        return split_steps(response, max_steps)
    if isinstance(response, (list, tuple)) or (
        hasattr(response, "tolist") and not isinstance(response, bytes)
    ):
        steps = list(response.tolist() if hasattr(response, "tolist") else response)
        if not steps:
            raise RowError("pre-split steps are empty", kind="invalid_response")
        bad = [type(s).__name__ for s in steps if not isinstance(s, str)]
        if bad:
            raise RowError(f"pre-split steps must be strings, got {bad[0]}", kind="invalid_response")
        return steps
    raise RowError(
        f"a response must be a string or a list of step strings, got {type(response).__name__}",
        kind="invalid_response",
    )


def common_prefix_length(sequences: Sequence[np.ndarray]) -> int:
    """Length of the longest common prefix of token sequences (vectorised per pair)."""
    first = sequences[0]
    length = len(first)
    for seq in sequences[1:]:
        n = min(length, len(seq))
        mismatch = np.flatnonzero(first[:n] != seq[:n])
        length = int(mismatch[0]) if mismatch.size else n
    return length


def prepare_group(
    question: str,
    steps_per_candidate: Sequence[Sequence[str] | RowError],
    tiles_per_image: Sequence[np.ndarray],
    tokenizer: Tokenizer,
    *,
    system_message: str,
    image_tokens_per_tile: int,
    image_token_id: int,
    max_context: int | None = None,
    context_policy: ContextPolicy = "error",
) -> PreparedGroup:
    """Tokenize every candidate of a group and split off the shared prefix.

    Problems of the whole group (no question, image placeholders that do not match the images)
    raise :class:`RowError`. Problems of one candidate (a step that forges a score marker, text
    that injects image tokens, a conversation longer than ``max_context``) are recorded in
    ``errors[k]`` and that candidate is left out of the shared prefix and of scoring. A caller may
    pass a ``RowError`` in place of a candidate's steps to carry an earlier failure through.

    With ``context_policy="truncate"`` a conversation over ``max_context`` keeps its longest run of
    leading steps that fits (whole steps only: a step cut in the middle would be scored on text
    the policy never finished) and is flagged in ``truncated[k]``; if not even the first step
    fits, it is a ``context_length`` error as under ``"error"``.
    """
    if not isinstance(question, str) or not question:
        raise RowError("question is missing or not a non-empty string", kind="invalid_question")
    if not steps_per_candidate:
        raise RowError("the group has no candidate responses", kind="no_candidates")
    tile_counts = [int(t.shape[0]) for t in tiles_per_image]
    try:
        head = conversation_head(
            render_question(question, tile_counts, image_tokens_per_tile), system_message
        )
    except ValueError as exc:
        raise RowError(str(exc), kind="image_placeholder_mismatch") from exc
    expected_image_tokens = sum(tile_counts) * image_tokens_per_tile
    empty = np.zeros(0, dtype=np.int64)
    tails = [conversation_tail(s) if not isinstance(s, RowError) and s else "" for s in steps_per_candidate]
    encoded = encode_shared_head(tokenizer, head, tails)

    def checked(steps: Sequence[str], ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        try:
            pos = find_score_positions(ids, tokenizer, len(steps))
        except ValueError as exc:
            raise RowError(str(exc), kind="steps_unplaceable") from exc
        found = int((ids == image_token_id).sum())
        if found != expected_image_tokens:
            raise RowError(
                f"text holds {found} image tokens where the images need {expected_image_tokens}",
                kind="image_tokens_in_text",
            )
        if max_context is not None and len(ids) > max_context:
            raise ContextLengthError(f"conversation has {len(ids)} tokens, over the context of {max_context}")
        return ids, pos

    def longest_fitting(steps: Sequence[str]) -> tuple[int, np.ndarray, np.ndarray]:
        # Tokens grow with every step kept, so the number of steps that fit is found by bisection
        # (a handful of re-encodings of this one candidate).
        best: tuple[int, np.ndarray, np.ndarray] | None = None
        lo, hi = 1, len(steps) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            ids = encode_shared_head(tokenizer, head, [conversation_tail(steps[:mid])])[0]
            try:
                best = (mid, *checked(steps[:mid], ids))
                lo = mid + 1
            except ContextLengthError:
                hi = mid - 1
        if best is None:
            raise ContextLengthError(
                f"not even the first step fits: the conversation up to it is over the context of {max_context}"
            )
        return best

    sequences: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    errors: list[RowError | None] = []
    kept_steps: list[list[str]] = []
    truncated: list[bool] = []
    for steps, ids in zip(steps_per_candidate, encoded, strict=True):
        kept = [] if isinstance(steps, RowError) else list(steps)
        cut = False
        try:
            if isinstance(steps, RowError):
                raise steps
            if not steps:
                raise RowError("a response needs at least one step", kind="invalid_response")
            try:
                ids, pos = checked(steps, ids)
            except ContextLengthError:
                if context_policy != "truncate":
                    raise
                n, ids, pos = longest_fitting(steps)
                kept, cut = kept[:n], True
        except RowError as exc:
            sequences.append(empty)
            positions.append(empty)
            errors.append(exc)
            kept_steps.append(kept)
            truncated.append(False)
            continue
        sequences.append(ids)
        positions.append(pos)
        errors.append(None)
        kept_steps.append(kept)
        truncated.append(cut)
    valid = [s for s, e in zip(sequences, errors, strict=True) if e is None]
    p = common_prefix_length(valid) if valid else 0
    tiles = np.concatenate(tiles_per_image) if tiles_per_image else np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return PreparedGroup(
        prefix=valid[0][:p].copy() if valid else empty,
        suffixes=[s[p:].copy() if e is None else empty for s, e in zip(sequences, errors, strict=True)],
        positions=positions,
        tiles=tiles,
        steps=kept_steps,
        errors=errors,
        truncated=truncated,
    )
