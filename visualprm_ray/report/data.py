"""What the report shows, computed from one run's output table and manifest: no plotting, no HTML.

The table is read once with only the light columns (no response text: a run of millions of rows
keeps its responses on disk); the responses of the few groups the report shows in full are read
afterwards with a filter on their ids. Everything goes through :mod:`visualprm_ray.storage`, so a
local directory and an ``s3://`` prefix are read the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from visualprm_ray.schema import RESERVED

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset

    from visualprm_ray.storage import StorageOptions

# Everything the summary and the plots need; `response` and the passthrough columns are left out.
# OPTIONAL_COLUMNS are read when the output has them (outputs written before they existed do not).
LIGHT_COLUMNS = [
    "id",
    "candidate_index",
    "num_steps",
    "step_scores",
    "score",
    "rank",
    "is_best",
    "error",
    "error_stage",
]
OPTIONAL_COLUMNS = ["error_kind", "truncated"]
# Step positions and step counts beyond this share one "N+" bucket, so a run with
# scoring.max_steps off (hundreds of steps) still gives readable plots.
MAX_POSITIONS = 24


class ReportError(RuntimeError):
    """A report that cannot be made; the message is meant for the user."""


@dataclass
class Run:
    """One finished run: where it is, its manifest, and its output table (light columns)."""

    uri: str
    manifest: dict[str, Any]
    complete: bool  # _SUCCESS is there
    files: list[str]
    table: pa.Table
    passthrough: list[str]
    dataset: pyarrow.dataset.Dataset | None  # None when the run wrote no files
    options: StorageOptions | None = None  # how the output (and the input, for images) is reached

    @property
    def max_steps(self) -> int | None:
        return ((self.manifest.get("config") or {}).get("scoring") or {}).get("max_steps", 12)


@dataclass
class ErrorKind:
    kind: str
    stages: list[str]
    count: int
    example: str


@dataclass
class Summary:
    rows: int
    groups: int
    scored: int
    errored: int
    unscored: int  # neither a score nor an error: should never happen, shown when it does
    truncated: int  # scored candidates of which only the leading steps fit the context
    typed_kinds: bool  # the output has an error_kind column (else kinds come from the messages)
    by_stage: list[tuple[str, int]]
    by_kind: list[ErrorKind]
    scores: np.ndarray  # one per scored candidate
    num_steps: np.ndarray  # aligned with scores
    best_scores: np.ndarray  # one per group that has a scored candidate (its best-of-N pick)
    step_positions: np.ndarray  # 1-based, one per step of every scored candidate
    step_values: np.ndarray
    margin_ids: list[str]  # groups with two scored candidates or more
    margins: np.ndarray  # best minus runner-up, aligned with margin_ids
    single_candidate_groups: int  # groups with exactly one scored candidate: no margin
    group_ids: list[str]  # groups with a scored candidate, by best score ascending
    group_best: np.ndarray  # aligned with group_ids

    def margin_of(self, group_id: str) -> float | None:
        try:
            return float(self.margins[self.margin_ids.index(group_id)])
        except ValueError:
            return None


@dataclass
class CandidateView:
    candidate_index: int | None
    rank: int | None
    score: float | None
    is_best: bool
    truncated: bool
    # (step text or None, step score); texts are None when they cannot be matched to the scores.
    steps: list[tuple[str | None, float | None]]
    steps_note: str | None
    error: str | None
    error_stage: str | None
    fields: list[tuple[str, str]] = field(default_factory=list)  # passthrough values of this candidate


@dataclass
class GroupView:
    id: str
    best: float
    margin: float | None
    fields: list[tuple[str, str]]  # passthrough values shared by the whole group
    candidates: list[CandidateView]
    question: str | None = None  # the question column passed through by the job (output.include_question)
    thumbnails: list[str] = field(default_factory=list)  # the group's images, small, as data URIs
    image_note: str | None = None  # why an image is not shown


# ------------------------------------------------------------------------------------------- reading


def load_run(uri: str, options: StorageOptions | None = None) -> Run:
    """Read a run's manifest and the light columns of its output table."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from visualprm_ray.job.driver import MANIFEST, SUCCESS
    from visualprm_ray.schema import OUTPUT_SCHEMA
    from visualprm_ray.storage import fsspec_filesystem, list_files, pyarrow_filesystem, redact

    fs, root = fsspec_filesystem(uri, options)
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        raise ReportError(
            f"no finished run at {redact(uri)}: {MANIFEST} is missing (the job writes it, then {SUCCESS}, "
            "when it finishes)"
        ) from None
    complete = fs.exists(f"{root}/{SUCCESS}")
    files = list_files(uri, options, recursive=False)  # the job's files, as the job counts them
    if not files:
        return Run(uri, manifest, complete, [], OUTPUT_SCHEMA.empty_table(), [], None, options)
    pa_fs, _ = pyarrow_filesystem(uri, options)
    # list_files gives URIs; the pyarrow filesystem wants its own paths (bucket/key, or absolute).
    dataset = ds.dataset([fs._strip_protocol(f) for f in files], filesystem=pa_fs, format="parquet")
    passthrough = [name for name in dataset.schema.names if name not in RESERVED]
    columns = [*LIGHT_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in dataset.schema.names)]
    table = dataset.to_table(columns=columns)
    return Run(uri, manifest, complete, files, pa.table(table), passthrough, dataset, options)


# ----------------------------------------------------------------------------------------- summaries


def error_kind(error: str) -> str:
    """The text before the first ':' of an error message: its kind when the output has no
    ``error_kind`` column (the pipeline wrote ``kind: detail`` messages before it had one)."""
    return error.split(":", 1)[0].strip() or "(empty)"


def summarize(run: Run) -> Summary:
    import numpy as np
    import pyarrow.compute as pc

    table = run.table
    errors = pc.is_valid(table["error"])
    score = table["score"]
    # A NaN score is no score: it would poison every mean and histogram downstream.
    has_score = pc.and_(pc.is_valid(score), pc.invert(pc.is_nan(pc.fill_null(score, 0.0))))
    scored_mask = pc.and_(has_score, pc.invert(errors))
    scored = table.filter(scored_mask)

    by_stage: dict[str, int] = {}
    kinds: dict[str, ErrorKind] = {}
    errored = table.filter(errors)
    # The typed kind when the output has it, else the message's prefix.
    typed = (
        errored["error_kind"].to_pylist() if "error_kind" in errored.column_names else [None] * len(errored)
    )
    for stage, error, typed_kind in zip(
        errored["error_stage"].to_pylist(), errored["error"].to_pylist(), typed, strict=True
    ):
        stage = stage or "(unknown)"
        by_stage[stage] = by_stage.get(stage, 0) + 1
        kind = typed_kind or error_kind(error)
        entry = kinds.setdefault(kind, ErrorKind(kind, [], 0, error))
        entry.count += 1
        if stage not in entry.stages:
            entry.stages.append(stage)

    scores = scored["score"].to_numpy().astype(np.float64)
    num_steps = pc.fill_null(scored["num_steps"], 0).to_numpy().astype(np.int64)

    steps = scored["step_scores"].combine_chunks() if scored.num_rows else None
    if steps is not None and len(steps):
        values = pc.list_flatten(steps).to_numpy(zero_copy_only=False).astype(np.float64)
        parents = pc.list_parent_indices(steps).to_numpy()
        offsets = steps.offsets.to_numpy()[:-1]
        positions = np.arange(len(values)) - (offsets[parents] - offsets[0]) + 1
        keep = ~np.isnan(values)
        step_positions, step_values = positions[keep], values[keep]
    else:
        step_positions, step_values = np.zeros(0, np.int64), np.zeros(0, np.float64)

    # Per group: sort by (id, score desc), then the first row of a group is its best-of-N pick and
    # the second its runner-up.
    group_ids: list[str] = []
    group_best = np.zeros(0)
    margin_ids: list[str] = []
    margins = np.zeros(0)
    single = 0
    if scored.num_rows:
        order = pc.sort_indices(scored, sort_keys=[("id", "ascending"), ("score", "descending")])
        ids = np.asarray(scored["id"].take(order).to_pylist(), dtype=object)
        sorted_scores = scores[order.to_numpy()]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        sizes = np.diff(np.r_[starts, len(ids)])
        best = sorted_scores[starts]
        two = sizes >= 2
        margins = best[two] - sorted_scores[starts[two] + 1]
        margin_ids = [str(i) for i in ids[starts[two]]]
        single = int((sizes == 1).sum())
        by_best = np.argsort(best, kind="stable")
        group_ids = [str(i) for i in ids[starts][by_best]]
        group_best = best[by_best]

    rows = table.num_rows
    n_errored = errored.num_rows
    return Summary(
        rows=rows,
        groups=int(pc.count_distinct(table["id"]).as_py()) if rows else 0,
        scored=scored.num_rows,
        errored=n_errored,
        unscored=rows - scored.num_rows - n_errored,
        typed_kinds="error_kind" in table.column_names,
        truncated=(
            int(pc.sum(pc.fill_null(scored["truncated"], False)).as_py() or 0)
            if "truncated" in scored.column_names
            else 0
        ),
        by_stage=sorted(by_stage.items(), key=lambda kv: (-kv[1], kv[0])),
        by_kind=sorted(kinds.values(), key=lambda k: (-k.count, k.kind)),
        scores=scores,
        num_steps=num_steps,
        best_scores=np.sort(group_best) if len(group_best) else group_best,
        step_positions=step_positions,
        step_values=step_values,
        margin_ids=margin_ids,
        margins=margins,
        single_candidate_groups=single,
        group_ids=group_ids,
        group_best=group_best,
    )


# ------------------------------------------------------------------------------------ groups in full


def pick_groups(summary: Summary, n: int) -> tuple[list[str], list[str]]:
    """The ``n`` lowest- and ``n`` highest-scoring groups (by their best candidate), no group twice."""
    low = summary.group_ids[:n]
    high = [g for g in reversed(summary.group_ids) if g not in low][:n]
    return low, high


def _display_value(value: Any) -> str | None:
    """A short text for a passthrough value; None for what does not read as text (bytes, nested)."""
    if value is None or isinstance(value, (bytes, bytearray, dict, list)):
        return None
    text = str(value)
    return text if len(text) <= 120 else text[:119] + "…"


def _steps_of(response: str | None, step_scores: list[float] | None, max_steps: int | None, truncated: bool):
    from visualprm_ray.model.prompt import split_steps

    scores = list(step_scores or [])
    if response is None:
        note = "response not stored (output.include_response is off): step scores only"
        return [(None, s) for s in scores], note
    texts = split_steps(response, max_steps)
    if truncated and len(texts) > len(scores):
        # Only the leading steps that fit the context were scored: they pair with the first texts.
        note = f"truncated: the first {len(scores)} of {len(texts)} steps fit the context and were scored"
        return [(t, scores[i] if i < len(scores) else None) for i, t in enumerate(texts)], note
    if len(texts) != len(scores):
        # Pre-split steps (the input's `steps` column) or another max_steps: the split would pair
        # texts with the wrong scores, which is worse than showing none.
        note = f"the response splits into {len(texts)} steps but {len(scores)} were scored: step scores only"
        return [(None, s) for s in scores], note
    return list(zip(texts, scores, strict=True)), None


def group_views(run: Run, summary: Summary, ids: list[str]) -> list[GroupView]:
    """The candidates of ``ids`` with their step texts and scores, in the order of ``ids``."""
    import pyarrow.dataset as ds

    if not ids or run.dataset is None:
        return []
    scalar = [
        name for name in run.passthrough if not _is_nested_or_binary(run.dataset.schema.field(name).type)
    ]
    columns = [*run.table.column_names, "response", *scalar]
    rows = run.dataset.to_table(columns=columns, filter=ds.field("id").isin(ids)).to_pylist()
    best = dict(zip(summary.group_ids, summary.group_best.tolist(), strict=True))
    from visualprm_ray.report.images import thumbnails

    question_col = ((run.manifest.get("config") or {}).get("input") or {}).get("question_column")
    images = thumbnails(run.manifest, ids, run.options)
    by_id: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for row in rows:
        by_id[row["id"]].append(row)
    views = []
    for gid in ids:
        members = sorted(
            by_id[gid],
            key=lambda r: (r["rank"] is None, r["rank"] or 0, r["candidate_index"] or 0),
        )
        shared, own = [], []
        for name in scalar:
            values = [_display_value(r[name]) for r in members]
            if all(v is None for v in values):
                continue
            (shared if len(set(values)) == 1 else own).append(name)
        candidates = []
        for r in members:
            truncated = bool(r.get("truncated"))
            steps, note = _steps_of(r["response"], r["step_scores"], run.max_steps, truncated)
            candidates.append(
                CandidateView(
                    candidate_index=r["candidate_index"],
                    rank=r["rank"],
                    score=r["score"],
                    is_best=bool(r["is_best"]),
                    truncated=truncated,
                    steps=steps,
                    steps_note=note if steps else None,
                    error=r["error"],
                    error_stage=r["error_stage"],
                    fields=[(n, v) for n in own if (v := _display_value(r[n])) is not None],
                )
            )
        question = members[0].get(question_col) if question_col in scalar else None
        fields = [
            (n, v) for n in shared if n != question_col and (v := _display_value(members[0][n])) is not None
        ]
        thumbs, note = images.get(gid, ([], None))
        views.append(
            GroupView(gid, best[gid], summary.margin_of(gid), fields, candidates, question, thumbs, note)
        )
    return views


def _is_nested_or_binary(dtype: pa.DataType) -> bool:
    import pyarrow.types as t

    return (
        t.is_nested(dtype) or t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype)
    )
