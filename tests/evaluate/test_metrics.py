"""Step macro F1: hand-computed values, edge cases, and a brute-force cross-check."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from visualprm_ray.evaluate.metrics import (
    best_threshold,
    class_f1,
    pool,
    step_f1,
    threshold_grid,
)


def test_hand_computed_counts_and_f1():
    # predicted correct (> 0.5): 0.9 0.6 0.7; the neutral 0.99 is left out.
    r = step_f1([1, 1, 1, -1, -1, 0], [0.9, 0.6, 0.2, 0.7, 0.1, 0.99], 0.5)
    assert (r.tp, r.fn, r.fp, r.tn, r.neutral) == (2, 1, 1, 1, 1)
    assert (r.steps, r.correct, r.incorrect) == (5, 3, 2)
    assert r.f1_correct == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)
    assert r.f1_incorrect == pytest.approx(1 / 2)  # 2*1 / (2*1 + 1 + 1)
    assert r.macro_f1 == pytest.approx(7 / 12)


def test_threshold_is_strict():
    # A score equal to the threshold is predicted incorrect.
    r = step_f1([1, -1], [0.5, 0.5], 0.5)
    assert (r.tp, r.fn, r.fp, r.tn) == (0, 1, 0, 1)
    assert r.f1_correct == 0.0 and r.f1_incorrect == pytest.approx(2 / 3)
    assert step_f1([1, -1], [0.5, 0.5], 0.49).tp == 1


def test_class_absent_but_predicted_scores_zero():
    # No incorrect step, yet one is predicted incorrect: F1(-) = 0 / (0 + 1) = 0, as scikit-learn.
    r = step_f1([1, 1, 1], [0.9, 0.2, 0.8], 0.5)
    assert r.f1_correct == pytest.approx(0.8)  # 2*2 / (2*2 + 0 + 1)
    assert r.f1_incorrect == 0.0
    assert r.macro_f1 == pytest.approx(0.4)


def test_class_absent_and_never_predicted_is_undefined_and_left_out():
    r = step_f1([1, 1], [0.9, 0.8], 0.5)
    assert r.f1_correct == 1.0 and r.f1_incorrect is None
    assert r.macro_f1 == 1.0
    r = step_f1([-1, -1, 0], [0.1, 0.3, 0.9], 0.5)
    assert r.f1_correct is None and r.f1_incorrect == 1.0 and r.macro_f1 == 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], []])
def test_all_neutral_or_empty_has_no_f1(labels):
    r = step_f1(labels, [0.3] * len(labels), 0.5)
    assert r.steps == 0 and r.neutral == len(labels)
    assert r.f1_correct is None and r.f1_incorrect is None and r.macro_f1 is None


def test_class_f1_formula():
    assert class_f1(0, 0, 0) is None
    assert class_f1(3, 1, 2) == pytest.approx(6 / 9)
    assert class_f1(0, 2, 0) == 0.0


def test_bad_inputs_are_loud():
    with pytest.raises(ValueError, match="1, -1 or 0"):
        step_f1([1, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        step_f1([1, -1], [0.1, math.nan], 0.5)
    with pytest.raises(ValueError, match="same length"):
        step_f1([1, -1], [0.1], 0.5)
    # A neutral step's score is never used, so it may be anything.
    assert step_f1([0, 1], [math.nan, 0.9], 0.5).tp == 1


def test_poolings_hand_computed():
    a = step_f1([1, 1, -1], [0.9, 0.2, 0.1], 0.5)  # tp 1 fn 1 fp 0 tn 1: macro 2/3
    b = step_f1([1, -1, -1, -1, 1], [0.8, 0.9, 0.3, 0.6, 0.7], 0.5)  # tp 2 fn 0 fp 2 tn 1: macro 7/12
    c = step_f1([0, 0], [0.1, 0.9], 0.5)  # no labelled step: no weight, no vote
    assert a.macro_f1 == pytest.approx(2 / 3) and b.macro_f1 == pytest.approx(7 / 12)
    pooled = pool({"A": a, "B": b, "C": c})
    # micro: tp 3 fn 1 fp 2 tn 2 -> F1(+) = 6/9, F1(-) = 4/7
    assert pooled["micro"] == pytest.approx((6 / 9 + 4 / 7) / 2)
    assert pooled["weighted"] == pytest.approx((2 / 3 * 3 + 7 / 12 * 5) / 8)
    assert pooled["mean"] == pytest.approx((2 / 3 + 7 / 12) / 2)
    assert pool({"C": c}) == {"micro": None, "weighted": None, "mean": None}
    with pytest.raises(ValueError, match="different thresholds"):
        pool({"A": a, "B": step_f1([1], [0.9], 0.6)})


def test_threshold_grid_and_best():
    grid = threshold_grid()
    assert len(grid) == 19 and grid[0] == 0.05 and grid[-1] == 0.95 and 0.15 in grid
    assert threshold_grid(0.1, 0.3, 0.1) == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        threshold_grid(0.5, 0.1, 0.1)
    assert best_threshold([(0.3, 0.7), (0.1, 0.5), (0.2, 0.7), (0.4, None)]) == (0.2, 0.7)
    assert best_threshold([(0.1, None)]) is None


def test_matches_a_brute_force_reference_on_random_data(macro_f1_by_hand):
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(0, 12)
        labels = [rng.choice((1, 1, -1, 0)) for _ in range(n)]
        scores = [rng.choice((0.25, 0.5, 0.75, rng.random())) for _ in range(n)]
        threshold = rng.choice((0.25, 0.5, 0.8))
        expected = macro_f1_by_hand(labels, scores, threshold)
        got = step_f1(np.array(labels, dtype=np.int8), np.array(scores), threshold).macro_f1
        assert (got is None and expected is None) or got == pytest.approx(expected)
