"""Scores, ranks and the best flag within a group."""

from __future__ import annotations

import pytest

from visualprm_ray.job import stages as col
from visualprm_ray.job.stages.aggregate import aggregate_group


def test_mean_min_last_and_stable_rank():
    out = aggregate_group([[0.2, 0.4], [0.9], None, [0.3, 0.3], [0.9, 0.9, 0.9]])
    assert out[col.SCORE][0] == pytest.approx(0.3)
    assert out[col.SCORE_MIN] == [0.2, 0.9, None, 0.3, 0.9]
    assert out[col.SCORE_LAST] == [0.4, 0.9, None, 0.3, 0.9]
    # 0.9 ties between candidates 1 and 4: input order decides; the errored one has no rank.
    assert out[col.RANK] == [2, 0, None, 3, 1]
    assert out[col.IS_BEST] == [False, True, False, False, False]


def test_group_without_scores_has_no_best():
    out = aggregate_group([None, None])
    assert out[col.RANK] == [None, None]
    assert out[col.IS_BEST] == [False, False]
