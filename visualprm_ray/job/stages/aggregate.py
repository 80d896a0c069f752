"""Aggregate: per-candidate scores and ranks within each group (SPEC §2.3).

score = mean of the step scores (the paper's best aggregation), plus min and last for analysis;
rank by score descending with ties kept in input order (a stable sort); exactly one ``is_best`` per
group that has at least one scored candidate. Candidates with an error get null scores and ranks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from visualprm_ray.job import stages as col

_F32 = pa.list_(pa.float32())
_I32 = pa.list_(pa.int32())


def aggregate_group(step_scores: list[list[float] | None]) -> dict[str, list]:
    """Scores, ranks and the best flag for one group's candidates (None = not scored)."""
    score = [None if s is None else float(np.mean(np.asarray(s, dtype=np.float64))) for s in step_scores]
    scored = [k for k, s in enumerate(score) if s is not None]
    order = sorted(scored, key=lambda k: -score[k])  # sorted() is stable: ties keep input order
    rank: list[int | None] = [None] * len(score)
    for r, k in enumerate(order):
        rank[k] = r
    return {
        col.SCORE: score,
        col.SCORE_MIN: [None if s is None else float(min(s)) for s in step_scores],
        col.SCORE_LAST: [None if s is None else float(s[-1]) for s in step_scores],
        col.RANK: rank,
        col.IS_BEST: [r == 0 for r in rank],
    }


def aggregate(table: pa.Table) -> pa.Table:
    """``map_batches`` function: adds the aggregate list columns to every group row."""
    per_group = [aggregate_group(s) for s in table[col.STEP_SCORES].to_pylist()]
    types = {
        col.SCORE: _F32,
        col.SCORE_MIN: _F32,
        col.SCORE_LAST: _F32,
        col.RANK: _I32,
        col.IS_BEST: pa.list_(pa.bool_()),
    }
    for name, dtype in types.items():
        table = table.append_column(name, pa.array([g[name] for g in per_group], dtype))
    return table
