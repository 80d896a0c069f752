"""Step-level macro F1 as VisualProcessBench reports it (SPEC §8), in plain numpy.

Labels are 1 (correct step), -1 (incorrect) and 0 (neutral). Neutral steps are left out. A step
is predicted correct when its score is strictly greater than the threshold. Macro F1 is the mean
of the F1 of the "correct" class and the F1 of the "incorrect" class.

A class's F1 is ``2 TP / (2 TP + FP + FN)`` with that class as the positive one. It is undefined
(``None``) only when the class is neither present nor predicted (0 / 0); macro F1 then averages
the classes that are defined, which is what scikit-learn's ``f1_score(average="macro")`` does
with the labels present in the data. With no labelled step at all (empty, or all neutral) every
F1 is ``None``. A class present but never predicted, or predicted but absent, has F1 0.

Poolings over data sources, all reported, because the paper's "overall" is ambiguous:

* ``micro``: every labelled step of every source in one confusion matrix, then macro F1;
* ``weighted``: the mean of the sources' macro F1, weighted by their labelled (non-neutral) steps;
* ``mean``: the unweighted mean of the sources' macro F1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CORRECT, INCORRECT, NEUTRAL = 1, -1, 0
POOLINGS = ("micro", "weighted", "mean")


@dataclass(frozen=True)
class StepF1:
    """The confusion counts and F1 scores of a set of steps at one threshold.

    "Positive" is the "correct" class: ``tp`` = labelled correct and predicted correct,
    ``fn`` = labelled correct and predicted incorrect, ``fp`` = labelled incorrect and predicted
    correct, ``tn`` = labelled incorrect and predicted incorrect.
    """

    threshold: float
    tp: int
    fn: int
    fp: int
    tn: int
    neutral: int
    f1_correct: float | None
    f1_incorrect: float | None
    macro_f1: float | None

    @property
    def steps(self) -> int:
        """Labelled steps that count (neutral ones excluded)."""
        return self.tp + self.fn + self.fp + self.tn

    @property
    def correct(self) -> int:
        return self.tp + self.fn

    @property
    def incorrect(self) -> int:
        return self.fp + self.tn


def class_f1(tp: int, fp: int, fn: int) -> float | None:
    """F1 of one class from its counts; ``None`` when the class is neither present nor predicted."""
    denominator = 2 * tp + fp + fn
    return None if denominator == 0 else 2 * tp / denominator


def f1_from_counts(tp: int, fn: int, fp: int, tn: int, neutral: int = 0, *, threshold: float) -> StepF1:
    f1_correct = class_f1(tp, fp, fn)
    # The "incorrect" class as the positive one: its hits are tn, its false alarms fn, its misses fp.
    f1_incorrect = class_f1(tn, fn, fp)
    defined = [f for f in (f1_correct, f1_incorrect) if f is not None]
    macro = sum(defined) / len(defined) if defined else None
    return StepF1(threshold, tp, fn, fp, tn, neutral, f1_correct, f1_incorrect, macro)


def step_f1(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> StepF1:
    """Counts and F1 of steps with ``labels`` in {1, -1, 0} and ``scores``, at ``threshold``.

    Anything else (another label value, a NaN score, lengths that differ) is a caller's bug and
    raises ``ValueError``: a wrong metric must never be printed quietly.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-d of the same length")
    if labels.size and not np.isin(labels, (CORRECT, INCORRECT, NEUTRAL)).all():
        raise ValueError(f"labels must be 1, -1 or 0, got {sorted(set(labels.tolist()))}")
    counted = labels != NEUTRAL
    if not np.isfinite(scores[counted]).all():
        raise ValueError("a labelled step has a non-finite score")
    predicted_correct = scores > threshold
    is_correct = labels == CORRECT
    is_incorrect = labels == INCORRECT
    return f1_from_counts(
        tp=int((is_correct & predicted_correct).sum()),
        fn=int((is_correct & ~predicted_correct).sum()),
        fp=int((is_incorrect & predicted_correct).sum()),
        tn=int((is_incorrect & ~predicted_correct).sum()),
        neutral=int((~counted).sum()),
        threshold=threshold,
    )


def pool(per_source: Mapping[str, StepF1]) -> dict[str, float | None]:
    """The overall macro F1 of per-source results at one threshold, under each of :data:`POOLINGS`."""
    results = list(per_source.values())
    thresholds = {r.threshold for r in results}
    if len(thresholds) > 1:
        raise ValueError(f"cannot pool results at different thresholds: {sorted(thresholds)}")
    micro = f1_from_counts(
        sum(r.tp for r in results),
        sum(r.fn for r in results),
        sum(r.fp for r in results),
        sum(r.tn for r in results),
        threshold=thresholds.pop() if thresholds else 0.0,
    ).macro_f1
    # A source whose macro F1 is undefined has no labelled step, so it carries no weight anyway.
    defined = [r for r in results if r.macro_f1 is not None]
    weight = sum(r.steps for r in defined)
    weighted = sum(r.macro_f1 * r.steps for r in defined) / weight if weight else None
    mean = sum(r.macro_f1 for r in defined) / len(defined) if defined else None
    return {"micro": micro, "weighted": weighted, "mean": mean}


def threshold_grid(start: float = 0.05, stop: float = 0.95, step: float = 0.05) -> list[float]:
    """``start, start + step, ..., stop`` (inclusive), rounded so that 0.15 prints as 0.15."""
    if step <= 0 or stop < start:
        raise ValueError(f"bad threshold grid {start}:{stop}:{step}")
    # The epsilon keeps ``stop`` in the grid despite float error (0.9 / 0.05 is 17.999...).
    count = int((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


def best_threshold(values: Iterable[tuple[float, float | None]]) -> tuple[float, float] | None:
    """The ``(threshold, value)`` with the highest defined value; ties go to the lowest threshold."""
    best: tuple[float, float] | None = None
    for threshold, value in sorted(values):
        if value is not None and (best is None or value > best[1]):
            best = (threshold, value)
    return best
