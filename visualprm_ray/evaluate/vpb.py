"""VisualProcessBench: score the benchmark's human-labelled steps and report macro F1 (SPEC §8).

The benchmark is JSON lines: ``image`` (list of paths relative to an image root), ``question``,
``answer``, ``response`` = {``steps``: [...], ``process_correctness``: [1 / -1 / 0, ...]},
``policy_model`` and ``data_source``. Each sample's steps are scored exactly as given (a list of
steps: no joining, re-splitting or merging, so score k always belongs to label k), one
:meth:`VisualPRM.score` call per sample, in-process.

Outputs, in the output directory:

* ``step_scores.parquet``: one row per step (:data:`STEP_SCHEMA`); a sample that could not be
  scored (unreadable line, missing image, step/label count mismatch, context too long...) is one
  row with ``error`` set and null ``step_index``, ``label`` and ``score``. It is counted and listed,
  never fatal. A disagreement between the scorer and the given steps is a bug and raises.
* ``metrics.json``: macro F1 per data source and overall (three poolings, see
  :mod:`visualprm_ray.evaluate.metrics`) at the threshold, over a threshold sweep, and the best
  threshold of the sweep; the counts and the errored samples.

The metrics are always computed from the per-step table, so ``--scores step_scores.parquet``
recomputes exactly the same numbers without the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from visualprm_ray.evaluate import EvalInputError
from visualprm_ray.evaluate._io import join_uri, read_bytes, write_bytes
from visualprm_ray.evaluate.metrics import (
    CORRECT,
    INCORRECT,
    NEUTRAL,
    POOLINGS,
    StepF1,
    best_threshold,
    pool,
    step_f1,
    threshold_grid,
)

if TYPE_CHECKING:
    from visualprm_ray.model.prm import VisualPRM

STEP_SCORES_FILE = "step_scores.parquet"
METRICS_FILE = "metrics.json"
UNKNOWN_SOURCE = "(unknown)"  # the data_source of a sample that names none
PROGRESS_EVERY_S = 30.0

STEP_SCHEMA = pa.schema(
    [
        pa.field("sample_index", pa.int32()),  # 0-based index of the sample's line among non-blank lines
        pa.field("data_source", pa.string()),
        pa.field("policy_model", pa.string()),
        pa.field("step_index", pa.int32()),  # null on a sample's error row
        pa.field("label", pa.int8()),  # 1 correct, -1 incorrect, 0 neutral; null on an error row
        pa.field("score", pa.float32()),  # P(+) of the step; null on an error row
        pa.field("error", pa.string()),  # why the sample was not scored; null when it was
    ]
)


class BadSample(ValueError):
    """A sample that cannot be scored for a reason in the benchmark data."""


@dataclass(frozen=True)
class Sample:
    index: int
    question: str
    images: list[str]
    steps: list[str]
    labels: list[int]
    data_source: str | None
    policy_model: str | None


@dataclass(frozen=True)
class SampleError:
    sample_index: int
    data_source: str | None
    policy_model: str | None
    error: str


# ----------------------------------------------------------------------------------------------
# Reading the benchmark
# ----------------------------------------------------------------------------------------------


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_record(record: Any) -> tuple[str, list[str], list[str], list[int]]:
    if not isinstance(record, dict):
        raise BadSample(f"a sample must be a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question:
        raise BadSample("question is missing or not a non-empty string")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadSample("image must be a list of paths")
    response = record.get("response")
    if not isinstance(response, dict):
        raise BadSample("response must be an object with steps and process_correctness")
    steps, labels = response.get("steps"), response.get("process_correctness")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise BadSample("response.steps must be a non-empty list of strings")
    if not isinstance(labels, list):
        raise BadSample("response.process_correctness must be a list")
    if len(steps) != len(labels):
        raise BadSample(f"{len(steps)} steps but {len(labels)} process_correctness labels")
    # bool is an int in Python; a true/false label is not one of the benchmark's values.
    if not all(type(v) is int and v in (CORRECT, INCORRECT, NEUTRAL) for v in labels):
        raise BadSample(f"process_correctness values must be 1, -1 or 0, got {labels}")
    return question, images, steps, labels


def parse_sample(index: int, line: str) -> Sample | SampleError:
    """One benchmark line as a :class:`Sample`, or a :class:`SampleError` saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return SampleError(index, None, None, f"line is not valid JSON: {exc}")
    source = _optional_str(record.get("data_source")) if isinstance(record, dict) else None
    policy = _optional_str(record.get("policy_model")) if isinstance(record, dict) else None
    try:
        question, images, steps, labels = _parse_record(record)
    except BadSample as exc:
        return SampleError(index, source, policy, str(exc))
    return Sample(index, question, images, steps, labels, source, policy)


def read_samples(uri: str, *, limit: int | None = None) -> list[Sample | SampleError]:
    """The samples of a benchmark file (local or object storage); blank lines are skipped."""
    try:
        text = read_bytes(uri).decode("utf-8")
    except FileNotFoundError as exc:
        raise EvalInputError(f"benchmark file not found: {uri}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if limit is not None:
        lines = lines[:limit]
    return [parse_sample(i, line) for i, line in enumerate(lines)]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in STEP_SCHEMA.names})

    def add(self, **values: Any) -> None:
        for name, column in self.columns.items():
            column.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=STEP_SCHEMA)


def _add_error(rows: _Rows, index: int, source: str | None, policy: str | None, error: str) -> None:
    rows.add(sample_index=index, data_source=source, policy_model=policy, error=error)


def score_samples(
    prm: VisualPRM,
    samples: Sequence[Sample | SampleError],
    image_root: str | None,
    *,
    emit: Callable[[str], None] = print,
) -> pa.Table:
    """Score every sample's given steps; the per-step table (:data:`STEP_SCHEMA`), errors included."""
    from visualprm_ray.errors import ImageError, RowError
    from visualprm_ray.model.images import load_image

    rows = _Rows()
    errored = 0
    start = last = time.monotonic()
    for done, sample in enumerate(samples, 1):
        if isinstance(sample, SampleError):
            _add_error(rows, sample.sample_index, sample.data_source, sample.policy_model, sample.error)
            errored += 1
            continue
        try:
            images = [load_image(p, root=image_root, max_pixels=prm.max_pixels) for p in sample.images]
            # max_steps=None: a list of steps is never merged anyway; None says so and keeps it true.
            (result,) = prm.score(
                sample.question, [sample.steps], images=images or None, max_steps=None, on_error="record"
            )
        except (ImageError, RowError) as exc:  # data problems of this sample; anything else is a bug
            _add_error(rows, sample.index, sample.data_source, sample.policy_model, str(exc))
            errored += 1
            continue
        if result.error is not None:
            _add_error(rows, sample.index, sample.data_source, sample.policy_model, result.error)
            errored += 1
            continue
        if result.steps != sample.steps or len(result.step_scores) != len(sample.labels):
            raise RuntimeError(
                f"sample {sample.index}: {len(sample.steps)} steps given but {len(result.step_scores)} "
                "scores came back; step scores would no longer line up with the labels"
            )
        for k, (label, score) in enumerate(zip(sample.labels, result.step_scores, strict=True)):
            rows.add(
                sample_index=sample.index,
                data_source=sample.data_source,
                policy_model=sample.policy_model,
                step_index=k,
                label=label,
                score=score,
            )
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            emit(
                f"[eval-vpb] {done}/{len(samples)} samples done ({errored} errored), "
                f"{done / (now - start):.2f} samples/s"
            )
    return rows.table()


# ----------------------------------------------------------------------------------------------
# Metrics from the per-step table
# ----------------------------------------------------------------------------------------------


def f1_record(result: StepF1) -> dict[str, Any]:
    return {
        **asdict(result),
        "steps": result.steps,
        "correct": result.correct,
        "incorrect": result.incorrect,
    }


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    overall: dict[str, float | None]  # pooling -> macro F1
    per_source: dict[str, float | None]  # data source -> macro F1


@dataclass(frozen=True)
class Best:
    threshold: float
    macro_f1: float


@dataclass
class VPBReport:
    threshold: float
    samples: int
    scored_samples: int
    samples_per_source: dict[str, int]
    per_source: dict[str, StepF1]  # at the threshold
    micro: StepF1  # every source's steps pooled, at the threshold
    overall: dict[str, float | None]  # pooling -> macro F1 at the threshold
    sweep: list[SweepPoint]
    best: dict[str, Best | None]  # pooling or data source -> best threshold of the sweep
    errors: list[SampleError]
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "VisualProcessBench",
            "inputs": self.inputs,
            "threshold": self.threshold,
            "prediction": "a step is predicted correct when its score > threshold; neutral steps excluded",
            "poolings": {
                "micro": "every labelled step of every source pooled into one confusion matrix",
                "weighted": "mean of the per-source macro F1, weighted by labelled (non-neutral) steps",
                "mean": "unweighted mean of the per-source macro F1",
            },
            "counts": {
                "samples": self.samples,
                "scored_samples": self.scored_samples,
                "errored_samples": len(self.errors),
                "steps": self.micro.steps,
                "correct": self.micro.correct,
                "incorrect": self.micro.incorrect,
                "neutral": self.micro.neutral,
            },
            "overall": self.overall,
            "micro": f1_record(self.micro),
            "per_source": {
                source: {"samples": self.samples_per_source[source], **f1_record(result)}
                for source, result in self.per_source.items()
            },
            "sweep": [asdict(point) for point in self.sweep],
            "best": {key: None if b is None else asdict(b) for key, b in self.best.items()},
            "errors": [asdict(e) for e in self.errors],
        }


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def evaluate_steps(
    table: pa.Table, *, threshold: float = 0.5, grid: Sequence[float] | None = None
) -> VPBReport:
    """Macro F1 from a per-step table (:data:`STEP_SCHEMA` columns), at ``threshold`` and over ``grid``."""
    missing = [name for name in STEP_SCHEMA.names if name not in table.column_names]
    if missing:
        raise EvalInputError(f"the step scores table lacks the columns {missing}")
    grid = threshold_grid() if grid is None else list(grid)
    index, source, policy, step, label, score, error = (_column(table, n) for n in STEP_SCHEMA.names)
    errors: dict[int, SampleError] = {}
    labels: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    samples: dict[str, set[int]] = {}
    for i in range(table.num_rows):
        if error[i] is not None:
            errors.setdefault(index[i], SampleError(index[i], source[i], policy[i], error[i]))
            continue
        if step[i] is None or label[i] not in (CORRECT, INCORRECT, NEUTRAL) or score[i] is None:
            raise EvalInputError(
                f"row {i} of the step scores has no error but a null step or score, or a label "
                f"other than 1, -1, 0 ({label[i]!r})"
            )
        name = source[i] if source[i] is not None else UNKNOWN_SOURCE
        labels.setdefault(name, []).append(label[i])
        scores.setdefault(name, []).append(score[i])
        samples.setdefault(name, set()).add(index[i])
    overlap = set(errors) & set().union(*samples.values())
    if overlap:
        raise EvalInputError(f"samples {sorted(overlap)[:5]} have both scored steps and an error row")
    arrays = {name: (np.asarray(labels[name]), np.asarray(scores[name])) for name in sorted(labels)}

    def at(t: float) -> dict[str, StepF1]:
        return {name: step_f1(lab, sc, t) for name, (lab, sc) in arrays.items()}

    per_source = at(threshold)
    sweep = []
    for t in grid:
        results = at(t)
        sweep.append(SweepPoint(t, pool(results), {name: r.macro_f1 for name, r in results.items()}))
    best: dict[str, Best | None] = {}
    for key in [*POOLINGS, *arrays]:
        values = [(p.threshold, p.overall[key] if key in POOLINGS else p.per_source[key]) for p in sweep]
        found = best_threshold(values)
        best[key] = None if found is None else Best(*found)
    all_labels = np.concatenate([lab for lab, _ in arrays.values()]) if arrays else np.zeros(0, int)
    all_scores = np.concatenate([sc for _, sc in arrays.values()]) if arrays else np.zeros(0)
    scored = set().union(*samples.values())
    return VPBReport(
        threshold=threshold,
        samples=len(scored) + len(errors),
        scored_samples=len(scored),
        samples_per_source={name: len(samples[name]) for name in arrays},
        per_source=per_source,
        micro=step_f1(all_labels, all_scores, threshold),
        overall=pool(per_source),
        sweep=sweep,
        best=best,
        errors=[errors[k] for k in sorted(errors)],
    )


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_report(report: VPBReport) -> str:
    """The printed tables: F1 at the threshold per source and overall, then the sweep."""
    t = report.threshold
    name_width = max([len("overall (weighted)"), *(len(s) for s in report.per_source)])
    head = f"{'source':<{name_width}}  samples  steps  correct  incorrect  neutral  F1(+)   F1(-)   macro F1"
    lines = [
        f"VisualProcessBench macro F1 at threshold {t:g} (step predicted correct when score > {t:g}; "
        "neutral steps excluded)",
        head,
        "-" * len(head),
    ]

    def row(name: str, samples: int | str, r: StepF1, macro: float | None) -> str:
        return (
            f"{name:<{name_width}}  {samples:>7}  {r.steps:>5}  {r.correct:>7}  {r.incorrect:>9}  "
            f"{r.neutral:>7}  {_f(r.f1_correct):>6}  {_f(r.f1_incorrect):>6}  {_f(macro):>8}"
        )

    for name, r in report.per_source.items():
        lines.append(row(name, report.samples_per_source[name], r, r.macro_f1))
    lines.append("-" * len(head))
    lines.append(row("overall (micro)", report.scored_samples, report.micro, report.overall["micro"]))
    blank = " " * (len(head) - len("macro F1") - name_width - 2)
    lines.append(f"{'overall (weighted)':<{name_width}}  {blank}{_f(report.overall['weighted']):>8}")
    lines.append(f"{'overall (mean)':<{name_width}}  {blank}{_f(report.overall['mean']):>8}")
    lines.append(
        f"samples: {report.samples}, scored {report.scored_samples}, errored {len(report.errors)}"
        + (" (listed in metrics.json)" if report.errors else "")
    )
    lines += ["", "macro F1 over the threshold sweep"]
    keys = [*POOLINGS, *report.per_source]
    widths = [max(8, len(k)) for k in keys]
    lines.append("threshold  " + "  ".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True)))
    for point in report.sweep:
        values = [point.overall[k] if k in POOLINGS else point.per_source[k] for k in keys]
        lines.append(
            f"{point.threshold:>9g}  "
            + "  ".join(f"{_f(v):>{w}}" for v, w in zip(values, widths, strict=True))
        )
    best = [report.best[k] for k in keys]
    cells = zip(best, widths, strict=True)
    lines.append(
        f"{'best at':>9}  " + "  ".join(f"{'-' if b is None else f'{b.threshold:g}':>{w}}" for b, w in cells)
    )
    cells = zip(best, widths, strict=True)
    lines.append(
        f"{'best F1':>9}  " + "  ".join(f"{_f(None if b is None else b.macro_f1):>{w}}" for b, w in cells)
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _read_scores(uri: str) -> pa.Table:
    import io

    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(read_bytes(uri)))
    except FileNotFoundError as exc:
        raise EvalInputError(f"step scores file not found: {uri}") from exc


def _write_parquet(uri: str, table: pa.Table) -> None:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def run_eval_vpb(
    *,
    output: str | None,
    data: str | None = None,
    image_root: str | None = None,
    model: str | None = None,
    scores: str | None = None,
    threshold: float = 0.5,
    grid: Sequence[float] | None = None,
    device: str | None = None,
    dtype: str = "auto",
    limit: int | None = None,
    emit: Callable[[str], None] = print,
) -> VPBReport:
    """Score the benchmark with ``model`` (or read earlier ``scores``), write and print the metrics."""
    from visualprm_ray.storage import redact

    if (model is None) == (scores is None):
        raise EvalInputError("give exactly one of --model (score the benchmark) and --scores (recompute)")
    inputs: dict[str, Any] = {}
    if model is not None:
        if data is None or output is None:
            raise EvalInputError("--model needs --data and --output")
        table, inputs = _score_benchmark(data, image_root, model, device, dtype, limit, emit)
        _write_parquet(join_uri(output, STEP_SCORES_FILE), table)
    else:
        assert scores is not None
        table = _read_scores(scores)
        inputs = {"scores": redact(scores)}
    report = evaluate_steps(table, threshold=threshold, grid=grid)
    report.inputs = inputs
    emit(render_report(report))
    if output is not None:
        write_bytes(join_uri(output, METRICS_FILE), json.dumps(report.to_json(), indent=2).encode())
        emit(f"\nwrote {join_uri(output, METRICS_FILE)}" + ("" if scores else f" and {STEP_SCORES_FILE}"))
    return report


def _score_benchmark(
    data: str,
    image_root: str | None,
    model: str,
    device: str | None,
    dtype: str,
    limit: int | None,
    emit: Callable[[str], None],
) -> tuple[pa.Table, dict[str, Any]]:
    from visualprm_ray.model.prm import VisualPRM
    from visualprm_ray.storage import redact

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        # bf16 is what the model runs in on a GPU; CPUs are slow and inexact in it.
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if image_root is None and "://" not in data:
        image_root = str(Path(data).resolve().parent)  # the benchmark's paths are relative to its folder
    elif image_root is None:
        image_root = data.rsplit("/", 1)[0]
    samples = read_samples(data, limit=limit)
    emit(
        f"[eval-vpb] {len(samples)} samples from {redact(data)}; model {redact(model)} on {device} ({dtype})"
    )
    prm = VisualPRM.from_pretrained(model, device=device, dtype=dtype)
    table = score_samples(prm, samples, image_root, emit=emit)
    inputs = {
        "data": redact(data),
        "image_root": redact(image_root),
        "model": redact(model),
        "device": device,
        "dtype": dtype,
        "limit": limit,
    }
    return table, inputs
