"""Write: group rows -> one output row per candidate, in the schema of :mod:`visualprm_ray.schema`.

The explode into candidate rows happens in the same task as the Parquet write (Ray fuses the map
into the write), so a group's candidates are never split across write tasks: a partial commit can
never leave half a group behind (SPEC §5). A group with no candidates still leaves one row, with a
null ``candidate_index`` and its error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from visualprm_ray.job import stages as col
from visualprm_ray.schema import output_schema

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.inputs import ReadPlan


_AGGREGATES = (
    ("score", col.SCORE),
    ("score_min", col.SCORE_MIN),
    ("score_last", col.SCORE_LAST),
    ("rank", col.RANK),
    ("is_best", col.IS_BEST),
)


class ExplodeToCandidates:
    """``map_batches`` callable: group rows in, candidate rows in the output schema out."""

    def __init__(self, plan: ReadPlan, include_response: bool) -> None:
        self.passthrough = [f.name for f in plan.passthrough]
        self.per_candidate = plan.layout == "flat"  # flat passthrough values are lists per candidate
        self.include_response = include_response
        self.schema = output_schema(plan.passthrough)

    def __call__(self, table: pa.Table) -> pa.Table:
        data = {name: [] for name in self.schema.names}
        columns = {name: table[name].to_pylist() for name in table.column_names}
        for i in range(len(table)):
            indices = columns[col.CANDIDATE_INDEX][i]
            group_error = columns[col.GROUP_ERROR][i]
            n = len(indices)
            for k in range(max(n, 1)):
                empty = n == 0
                data["id"].append(columns[col.ID][i])
                data["candidate_index"].append(None if empty else indices[k])
                for name in self.passthrough:
                    value = columns[name][i]
                    if self.per_candidate:
                        value = None if empty else value[k]
                    data[name].append(value)
                response = None if empty else columns[col.RESPONSE_TEXT][i][k]
                data["response"].append(response if self.include_response else None)
                steps = None if empty else columns[col.STEP_SCORES][i][k]
                data["num_steps"].append(None if steps is None else len(steps))
                data["step_scores"].append(steps)
                for out, name in _AGGREGATES:
                    data[out].append(None if empty else columns[name][i][k])
                data["num_tiles"].append(columns[col.NUM_TILES][i] if steps is not None else None)
                data["num_tokens"].append(None if empty else columns[col.NUM_TOKENS][i][k])
                data["truncated"].append(None if steps is None else bool(columns[col.TRUNCATED][i][k]))
                if group_error is not None:
                    error = group_error
                    stage, kind = columns[col.GROUP_ERROR_STAGE][i], columns[col.GROUP_ERROR_KIND][i]
                elif columns[col.CANDIDATE_ERROR][i][k] is not None:
                    error = columns[col.CANDIDATE_ERROR][i][k]
                    stage = columns[col.CANDIDATE_ERROR_STAGE][i][k]
                    kind = columns[col.CANDIDATE_ERROR_KIND][i][k]
                elif steps is None:
                    raise AssertionError(f"group {columns[col.ID][i]!r} candidate {k}: no score and no error")
                else:
                    error = stage = kind = None
                data["error"].append(error)
                data["error_kind"].append(kind)
                data["error_stage"].append(stage)
        # Unscored candidates are not the best one: False rather than null keeps filters simple.
        data["is_best"] = [b is True for b in data["is_best"]]
        return pa.table(data, schema=self.schema)


# Bytes of an output row beyond its response text and passthrough values: id, step scores, the
# numbers and the error columns (a generous round figure; the estimate only sizes files).
_ROW_OVERHEAD = 200
_MIN_ROWS, _MAX_ROWS = 1_000, 2_000_000


def rows_per_file(config: JobConfig, plan: ReadPlan, candidates: int) -> int:
    """Candidate rows per output file: ``output.min_rows_per_file``, or ``output.target_file_bytes``
    over the bytes a candidate row takes, estimated from the input's footers (uncompressed)."""
    if config.output.min_rows_per_file is not None:
        return config.output.min_rows_per_file
    if not candidates:
        return _MIN_ROWS
    sizes = plan.column_sizes()
    inp = config.input
    texts = (
        [inp.responses_column, inp.response_column, inp.steps_column]
        if not plan.internal
        else [col.RESPONSES, col.STEPS]
    )
    text = sum(sizes.get(c, 0) for c in texts)
    passthrough = sum(sizes.get(f.name, 0) for f in plan.passthrough)
    if plan.layout == "grouped":
        # A group row's passthrough values are copied into each of its candidate rows.
        groups = max(1, plan.num_rows)
        passthrough = passthrough * candidates // groups
    per_row = text // candidates + passthrough // candidates + _ROW_OVERHEAD
    return int(min(_MAX_ROWS, max(_MIN_ROWS, config.output.target_file_bytes // per_row)))
