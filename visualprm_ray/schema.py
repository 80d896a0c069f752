"""The one output schema: one row per candidate response.

Defined once here, used by the writer, rendered by ``visualprm-ray schema`` and into the README, so
the three can never disagree. Every column has an explicit Arrow type: nulls are typed, never
inferred from the first batch (a batch of all-null errors would otherwise become a ``null`` column
and break readers that union files).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str


# Columns before the passthrough columns (keys), then after them (results).
KEY_COLUMNS = [
    Column(
        "id",
        pa.string(),
        "Group id: the input `id` column, or derived as `<file path relative to the input root>#<row>`.",
    ),
    Column(
        "candidate_index",
        pa.int32(),
        "Position of the candidate in its group's input order: the list order (grouped layout), the "
        "row order in the input files or input.candidate_index_column (flat layout); null for a "
        "group without candidates.",
    ),
]
RESULT_COLUMNS = [
    Column(
        "response", pa.string(), "The candidate's response text (null when output.include_response is off)."
    ),
    Column("num_steps", pa.int32(), "Number of scored steps after splitting and merging."),
    Column("step_scores", pa.list_(pa.float32()), "P(+) for each step: softmax over the '+' and '-' logits."),
    Column("score", pa.float32(), "Mean of step_scores: VisualPRM's response score."),
    Column("score_min", pa.float32(), "Minimum of step_scores."),
    Column("score_last", pa.float32(), "Last of step_scores."),
    Column("rank", pa.int32(), "Rank by score within the group, 0 = best; ties keep input order."),
    Column("is_best", pa.bool_(), "True for the single best-scoring candidate of the group."),
    Column("num_tiles", pa.int32(), "Image tiles the candidate was scored with (thumbnails included)."),
    Column("num_tokens", pa.int32(), "Tokens in the candidate's full scored conversation."),
    Column(
        "truncated",
        pa.bool_(),
        "True when the conversation was over the context and only the leading steps that fit were "
        "scored (scoring.context_policy 'truncate'); null for an unscored row.",
    ),
    Column("error", pa.string(), "Why the candidate was not scored, in words; null when it was."),
    Column(
        "error_kind",
        pa.string(),
        "The error's kind, one of a fixed set (see visualprm_ray.errors.ERROR_KINDS); null when scored.",
    ),
    Column("error_stage", pa.string(), "Stage that refused it: read, prepare or score; null when scored."),
]
OUTPUT_COLUMNS = KEY_COLUMNS + RESULT_COLUMNS
OUTPUT_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in OUTPUT_COLUMNS])
RESERVED = frozenset(c.name for c in OUTPUT_COLUMNS)


def output_schema(passthrough: pa.Schema | list[pa.Field] = ()) -> pa.Schema:
    """The output schema with the passthrough columns between the keys and the results."""
    fields = list(passthrough)
    clash = [f.name for f in fields if f.name in RESERVED]
    if clash:
        raise ValueError(f"passthrough columns {clash} collide with output columns; rename them or drop them")
    return pa.schema(
        [pa.field(c.name, c.type) for c in KEY_COLUMNS]
        + fields
        + [pa.field(c.name, c.type) for c in RESULT_COLUMNS]
    )


def render_schema_table() -> str:
    """The output schema as a Markdown table (the README shows the same text)."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    for c in KEY_COLUMNS:
        lines.append(f"| `{c.name}` | {c.type} | {c.description} |")
    lines.append(
        "| *passthrough* | as input | Other input columns, copied per candidate (see input.passthrough). |"
    )
    for c in RESULT_COLUMNS:
        lines.append(f"| `{c.name}` | {c.type} | {c.description} |")
    return "\n".join(lines)
