"""Select: one group's score rows and input rows -> the rows it gives in the chosen format, or why none.

The export shuffles two kinds of light rows by group id so that each group's meet in one
``map_groups`` call: the scores (one row per candidate: index, step scores, score, rank, error, the
passthrough columns) and the input (the question and the response texts as given, pre-split steps,
and where the row's image sits in its file, never the image itself). :func:`select_group` then
picks what the format asks for and says, for a group that gives nothing, why:

* ``dpo``: the best candidate (``is_best``) against the lowest-scoring one (the highest ``rank``;
  ties keep input order, as the ranks do), when the group has two scored candidates and the margin
  is at least ``min_margin``;
* ``sft``: the best candidate, when its score is at least ``min_score``;
* ``prm``: every scored candidate, its steps (as the job split them) and the labels
  ``step_score > threshold``.

Errored candidates never appear. Everything here is plain pyarrow and Python: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from visualprm_ray.job import stages as col

SIDE = "_vp_side"  # 0: an input row, 1: a score row
GIVEN_INDEX = "_vp_given_index"  # flat layout: the input's candidate index column, when configured
REASON = "_vp_reason"  # why the group gives no row (null on a data row)
FIRST = "_vp_first"  # true on the first row a group gives: groups are counted on it

INPUT_SIDE, SCORE_SIDE = 0, 1

# Why a group gives no row: the keys of ``_export.json``'s ``groups_skipped``.
REASONS = {
    "no_scored_candidate": "every candidate of the group errored (or it has none)",
    "one_scored_candidate": "dpo: only one candidate was scored, so there is no pair",
    "below_min_margin": "dpo: best score minus lowest score is under --min-margin",
    "below_min_score": "sft: the best score is under --min-score",
    "not_in_scores": "the input holds the group but the scores do not (an incomplete run)",
    "not_in_input": "the scores hold the group but the input does not (another or a changed input)",
    "image_unreadable": "the group's image could not be read from the input now",
}

# The score columns the export reads (output names; see visualprm_ray.schema).
SCORE_COLUMNS = {
    "candidate_index": pa.int32(),
    "step_scores": pa.list_(pa.float32()),
    "score": pa.float32(),
    "rank": pa.int32(),
    "is_best": pa.bool_(),
    "error": pa.string(),
}


def union_schema(passthrough: list[pa.Field]) -> pa.Schema:
    """The one schema both kinds of rows are cast to, so that a shuffle block may hold both."""
    return pa.schema(
        [
            pa.field(col.ID, pa.string()),
            pa.field(SIDE, pa.int8()),
            pa.field(col.QUESTION, pa.string()),
            pa.field(col.RESPONSES, pa.list_(pa.string())),
            pa.field(col.STEPS, pa.list_(pa.list_(pa.string()))),
            pa.field(GIVEN_INDEX, pa.int64()),
            pa.field(col.FILE, pa.int32()),
            pa.field(col.ROW, pa.int64()),
            *(pa.field(name, t) for name, t in SCORE_COLUMNS.items()),
            *passthrough,
        ]
    )


def _nulls(schema: pa.Schema, n: int, present: dict[str, Any]) -> pa.Table:
    columns = [present[f.name] if f.name in present else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def input_rows(table: pa.Table, *, layout: Literal["grouped", "flat"], schema: pa.Schema) -> pa.Table:
    """``map_batches``: input rows (internal names, row positions) -> union rows.

    A flat row becomes a one-candidate group fragment: its response as a one-item list, its
    pre-split steps as a one-item list of lists.
    """
    n = len(table)
    present: dict[str, Any] = {
        col.ID: table[col.ID].cast(pa.string()),
        SIDE: pa.array([INPUT_SIDE] * n, pa.int8()),
        col.QUESTION: table[col.QUESTION].cast(pa.string()),
        col.FILE: table[col.FILE].cast(pa.int32()),
        col.ROW: table[col.ROW].cast(pa.int64()),
    }
    responses = table[col.RESPONSES].combine_chunks()
    steps = table[col.STEPS].combine_chunks() if col.STEPS in table.column_names else None
    if layout == "flat":
        present[col.RESPONSES] = _one_item_lists(responses.cast(pa.string()))
        if steps is not None:
            present[col.STEPS] = _one_item_lists(steps.cast(pa.list_(pa.string())))
        if col.CANDIDATE_INDEX in table.column_names:
            present[GIVEN_INDEX] = table[col.CANDIDATE_INDEX].cast(pa.int64())
    else:
        present[col.RESPONSES] = responses.cast(pa.list_(pa.string()))
        if steps is not None:
            present[col.STEPS] = steps.cast(pa.list_(pa.list_(pa.string())))
    return _nulls(schema, n, present)


def _one_item_lists(values: pa.Array) -> pa.Array:
    import numpy as np

    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def score_rows(table: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """``map_batches``: score rows (output names) -> union rows."""
    n = len(table)
    present: dict[str, Any] = {
        col.ID: table["id"].cast(pa.string()),
        SIDE: pa.array([SCORE_SIDE] * n, pa.int8()),
    }
    for f in schema:
        if f.name in table.column_names and f.name != "id":
            present[f.name] = table[f.name].cast(f.type)
    return _nulls(schema, n, present)


@dataclass(frozen=True)
class Selection:
    """What :func:`select_group` needs besides the rows: the format, its filters, the splitting."""

    format: Literal["dpo", "sft", "prm"]
    layout: Literal["grouped", "flat"] = "grouped"  # the input's
    min_margin: float = 0.0
    min_score: float | None = None
    threshold: float = 0.5
    max_steps: int | None = None  # scoring.max_steps of the job: the steps are split as it split them
    passthrough: tuple[str, ...] = ()


def selected_schema(selection: Selection, passthrough: list[pa.Field]) -> pa.Schema:
    """The rows :func:`select_group` gives: the format's text and numbers, where the image is, and
    why a group gave nothing (``_vp_reason``, on a row of its own with everything else null)."""
    text = pa.string()
    by_format = {
        "dpo": [
            ("chosen", text),
            ("rejected", text),
            ("chosen_score", pa.float32()),
            ("rejected_score", pa.float32()),
            ("chosen_index", pa.int32()),
            ("rejected_index", pa.int32()),
        ],
        "sft": [("completion", text), ("score", pa.float32()), ("candidate_index", pa.int32())],
        "prm": [
            ("candidate_index", pa.int32()),
            ("completions", pa.list_(text)),
            ("labels", pa.list_(pa.bool_())),
            ("step_scores", pa.list_(pa.float32())),
            ("score", pa.float32()),
        ],
    }[selection.format]
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field(col.QUESTION, text),
            *(pa.field(n, t) for n, t in by_format),
            *passthrough,
            pa.field(col.IMAGE_FILE, pa.int32()),
            pa.field(col.IMAGE_ROW, pa.int64()),
            pa.field(REASON, pa.string()),
            pa.field(FIRST, pa.bool_()),
        ]
    )


def select_table(table: pa.Table, *, selection: Selection, schema: pa.Schema) -> pa.Table:
    """``map_groups`` function over the union rows of one group id (see :func:`select_group`)."""
    rows = select_group(table.to_pylist(), selection)
    rows[0][FIRST] = True
    return pa.Table.from_pylist(rows, schema=schema)


def _candidates(
    inputs: list[dict[str, Any]], layout: str
) -> tuple[dict[int, tuple[str | None, list[str] | None]], dict[str, Any]]:
    """The group's candidates from its input rows, by candidate index: (response, given steps).

    Grouped: the one row's list order. Flat: input order (file, then row), or the configured index
    column, as the job numbered them (:mod:`visualprm_ray.job.stages.regroup`).
    """
    inputs = sorted(inputs, key=lambda r: (r[col.FILE], r[col.ROW]))
    first = inputs[0]
    by_index: dict[int, tuple[str | None, list[str] | None]] = {}
    if layout == "grouped":  # one row per group (a repeated id errored every candidate in the job)
        responses = first[col.RESPONSES] or []
        steps = first[col.STEPS]
        for k, response in enumerate(responses):
            by_index[k] = (response, steps[k] if steps is not None and k < len(steps) else None)
        return by_index, first
    given = [r[GIVEN_INDEX] for r in inputs]
    use_given = all(g is not None for g in given) and len(set(given)) == len(given)
    if use_given:
        inputs = [r for _, r in sorted(zip(given, inputs, strict=True), key=lambda p: p[0])]
    for k, r in enumerate(inputs):
        index = int(r[GIVEN_INDEX]) if use_given else k
        steps = r[col.STEPS]
        by_index[index] = ((r[col.RESPONSES] or [None])[0], steps[0] if steps else None)
    return by_index, first


def select_group(rows: list[dict[str, Any]], selection: Selection) -> list[dict[str, Any]]:
    """One group's union rows -> its output rows (pre-image), or one row naming the reason."""
    from visualprm_ray.model.group import candidate_steps

    group_id = rows[0][col.ID]
    inputs = [r for r in rows if r[SIDE] == INPUT_SIDE]
    # One row per candidate: an unfinished run (--allow-incomplete) may hold a candidate twice, in
    # a file a resume would have removed; its first row stands for it.
    scores = list(
        {r["candidate_index"]: r for r in reversed([r for r in rows if r[SIDE] == SCORE_SIDE])}.values()
    )

    def skipped(reason: str) -> list[dict[str, Any]]:
        # No image to read; -1 sorts these rows together (a sort key is never null).
        return [{"id": group_id, REASON: reason, col.IMAGE_FILE: -1, col.IMAGE_ROW: -1}]

    if not scores:
        return skipped("not_in_scores")
    if not inputs:
        return skipped("not_in_input")
    scored = [
        r
        for r in scores
        if r["error"] is None and r["score"] is not None and r["candidate_index"] is not None
    ]
    if not scored:
        return skipped("no_scored_candidate")
    candidates, first = _candidates(inputs, selection.layout)
    base = {
        "id": group_id,
        col.QUESTION: first[col.QUESTION],
        col.IMAGE_FILE: first[col.FILE],
        col.IMAGE_ROW: first[col.ROW],
    }

    def response(r: dict[str, Any]) -> str:
        index = r["candidate_index"]
        if index not in candidates or candidates[index][0] is None:
            # The scores hold a scored candidate the input does not: the input is not the one scored.
            raise ValueError(
                f"group {group_id!r}: scored candidate {index} has no response in the input; "
                "is --input the input these scores were made from?"
            )
        return candidates[index][0]

    def passthrough(r: dict[str, Any]) -> dict[str, Any]:
        return {name: r[name] for name in selection.passthrough}

    best = [r for r in scored if r["is_best"]]
    if len(best) != 1:
        raise ValueError(f"group {group_id!r}: {len(best)} scored candidates are marked is_best, not 1")
    best = best[0]
    if selection.format == "dpo":
        if len(scored) < 2:
            return skipped("one_scored_candidate")
        lowest = max(scored, key=lambda r: r["rank"])
        if best["score"] - lowest["score"] < selection.min_margin:
            return skipped("below_min_margin")
        return [
            {
                **base,
                "chosen": response(best),
                "rejected": response(lowest),
                "chosen_score": best["score"],
                "rejected_score": lowest["score"],
                "chosen_index": best["candidate_index"],
                "rejected_index": lowest["candidate_index"],
                **passthrough(best),
            }
        ]
    if selection.format == "sft":
        if selection.min_score is not None and best["score"] < selection.min_score:
            return skipped("below_min_score")
        return [
            {
                **base,
                "completion": response(best),
                "score": best["score"],
                "candidate_index": best["candidate_index"],
                **passthrough(best),
            }
        ]
    out = []
    for r in sorted(scored, key=lambda r: r["candidate_index"]):
        text = response(r)
        given = candidates[r["candidate_index"]][1]
        steps = list(given) if given is not None else candidate_steps(text, selection.max_steps)
        step_scores = r["step_scores"] or []
        if len(steps) < len(step_scores):
            raise ValueError(
                f"group {group_id!r}, candidate {r['candidate_index']}: {len(step_scores)} step scores but "
                f"{len(steps)} steps; the scores were split with other settings than scoring.max_steps"
            )
        # A truncated candidate (scoring.context_policy 'truncate') was scored on its leading steps.
        steps = steps[: len(step_scores)]
        out.append(
            {
                **base,
                "candidate_index": r["candidate_index"],
                "completions": steps,
                "labels": [s > selection.threshold for s in step_scores],
                "step_scores": step_scores,
                "score": r["score"],
                **passthrough(r),
            }
        )
    return out
