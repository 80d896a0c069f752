"""A from-the-definition macro F1, shared by the metric and the benchmark tests as the hand count."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def reference_macro_f1(labels: Sequence[int], scores: Sequence[float], threshold: float) -> float | None:
    """Plain loops over (label, score), independent of the numpy code: F1 of each class whose
    2 TP + FP + FN is not zero, averaged; None when no class is defined."""
    f1s = []
    for positive in (1, -1):
        tp = fp = fn = 0
        for label, score in zip(labels, scores, strict=True):
            if label == 0:
                continue
            predicted = 1 if score > threshold else -1
            tp += label == positive and predicted == positive
            fp += label != positive and predicted == positive
            fn += label == positive and predicted != positive
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else None


@pytest.fixture
def macro_f1_by_hand() -> Callable[[Sequence[int], Sequence[float], float], float | None]:
    return reference_macro_f1
