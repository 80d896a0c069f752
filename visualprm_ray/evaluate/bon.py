"""Best-of-N accuracy of a finished scoring job's output table.

For every group (rows sharing ``id``) the final answer of each candidate is extracted from its
response and compared with the group's reference answer. Methods:

* ``first``: candidate 0 (the policy's first sample; greedy in the paper's harness).
* ``best_score`` / ``best_score_min`` / ``best_score_last``: the candidate with the highest
  ``score`` / ``score_min`` / ``score_last``; ties go to the lower ``candidate_index``. Errored
  (unscored) candidates are never picked; when every candidate errored the group counts as wrong.
* ``majority``: the most frequent extracted answer (candidates without an answer do not vote);
  ties go to the tied answer given first (lowest ``candidate_index``).
* ``weighted_vote``: the answer with the highest sum of ``score`` over its scored candidates; ties
  go to the answer given first.
* ``oracle``: any candidate is correct (the ceiling of every method above).

``first``, ``majority`` and ``oracle`` need no PRM, so they use every candidate with a response,
errored ones included: they describe the policy's candidates. A group with no reference answer is
skipped and counted; a group-level error row (null ``candidate_index``) is not a candidate.

Answers: by default the content of the last complete ``\\boxed{...}`` (nested braces kept), else
the text after the last ``Final answer:``; ``--extract REGEX`` replaces that with the last match
of REGEX (its first group when it has one). Normalised by stripping whitespace, ``$`` and a
trailing ``.``, compared case-insensitively, and numerically when both sides are numbers
(``3.0`` == ``3``). An empty answer is no answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from visualprm_ray.evaluate import EvalInputError

METHODS = (
    "first",
    "best_score",
    "best_score_min",
    "best_score_last",
    "majority",
    "weighted_vote",
    "oracle",
)
DEFAULT_EXTRACT = r"last \boxed{...}, else the text after the last 'Final answer:'"
NULL_GROUP = "(null)"  # the group-by value of groups whose column is null

_BOXED = re.compile(r"\\boxed\s*\{")
_FINAL_ANSWER = re.compile(r"final answer\s*[:：]\s*(.*)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}``, nested braces kept; None when there is none.

    "Last" is by start position, so ``\\boxed{\\boxed{5}}`` gives ``5``. An unterminated one (a
    truncated generation) is skipped in favour of the one before it.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : i]
    return None


def extract_answer(text: str | None, pattern: re.Pattern[str] | None = None) -> str | None:
    """A response's final answer, raw (see :func:`normalize_answer`); None when it gives none."""
    if text is None:
        return None
    if pattern is not None:
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if pattern.groups else last.group(0)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    finals = _FINAL_ANSWER.findall(text)
    return finals[-1] if finals else None


def normalize_answer(text: str | None) -> str | None:
    """Strip whitespace, ``$`` and trailing ``.`` (repeatedly: ``$5.$``); None when nothing is left."""
    if text is None:
        return None
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("$").rstrip(".")
    return text or None


def answer_key(text: str | None) -> Hashable | None:
    """What two answers are compared by: a Decimal for a number (``3.0`` == ``3``), else the
    case-folded normalised text. None for no answer."""
    normalized = normalize_answer(text)
    if normalized is None:
        return None
    try:
        number = Decimal(normalized)
    except InvalidOperation:
        return normalized.casefold()
    # "nan" and "inf" parse as Decimals but are words here; equal Decimals hash equal, 3.0 and 3 too.
    return number if number.is_finite() else normalized.casefold()


# ----------------------------------------------------------------------------------------------
# Picking
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    index: int
    answer: Hashable | None  # answer_key of the extracted answer
    score: float | None  # None when the candidate was not scored
    score_min: float | None
    score_last: float | None


def pick_best(candidates: Sequence[Candidate], by: str) -> Candidate | None:
    """The scored candidate with the highest ``by`` value; ties go to the lower index."""
    scored = [c for c in candidates if getattr(c, by) is not None]
    if not scored:
        return None
    return min(scored, key=lambda c: (-getattr(c, by), c.index))


def _vote(weights: Iterable[tuple[Candidate, float]]) -> Hashable | None:
    """The answer with the largest total weight; ties go to the answer given first (lowest index)."""
    totals: dict[Hashable, float] = {}
    first: dict[Hashable, int] = {}
    for c, weight in weights:
        if c.answer is None:
            continue
        totals[c.answer] = totals.get(c.answer, 0.0) + weight
        first[c.answer] = min(first.get(c.answer, c.index), c.index)
    if not totals:
        return None
    return min(totals, key=lambda a: (-totals[a], first[a]))


def majority_answer(candidates: Sequence[Candidate]) -> Hashable | None:
    return _vote((c, 1.0) for c in candidates)


def weighted_vote_answer(candidates: Sequence[Candidate]) -> Hashable | None:
    return _vote((c, c.score) for c in candidates if c.score is not None)


def judge(reference: Hashable, candidates: Sequence[Candidate]) -> dict[str, bool]:
    """Whether each method gets the group right."""

    def right(c: Candidate | None) -> bool:
        return c is not None and c.answer is not None and c.answer == reference

    by_index = {c.index: c for c in candidates}
    return {
        "first": right(by_index.get(0)),
        "best_score": right(pick_best(candidates, "score")),
        "best_score_min": right(pick_best(candidates, "score_min")),
        "best_score_last": right(pick_best(candidates, "score_last")),
        "majority": majority_answer(candidates) == reference,
        "weighted_vote": weighted_vote_answer(candidates) == reference,
        "oracle": any(right(c) for c in candidates),
    }


# ----------------------------------------------------------------------------------------------
# Tallies
# ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts over a set of groups; accuracy = correct / groups."""

    groups: int = 0
    candidates: int = 0
    errored_candidates: int = 0
    unanswered_candidates: int = 0  # no answer could be extracted
    all_errored_groups: int = 0  # no candidate scored: the PRM methods count as wrong
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))

    def add(self, candidates: Sequence[Candidate], verdict: dict[str, bool]) -> None:
        self.groups += 1
        self.candidates += len(candidates)
        self.errored_candidates += sum(c.score is None for c in candidates)
        self.unanswered_candidates += sum(c.answer is None for c in candidates)
        self.all_errored_groups += all(c.score is None for c in candidates)
        for method, ok in verdict.items():
            self.correct[method] += ok

    def accuracy(self) -> dict[str, float | None]:
        return {m: (self.correct[m] / self.groups if self.groups else None) for m in METHODS}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy()}


@dataclass
class BoNReport:
    output: str
    answer_column: str
    response_column: str
    group_by: str | None
    extract: str
    overall: Tally
    by_group: dict[str, Tally]
    skipped_no_reference: int  # groups whose reference answer is null or empty

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "answer_column": self.answer_column,
            "response_column": self.response_column,
            "group_by": self.group_by,
            "extract": self.extract,
            "methods": list(METHODS),
            "skipped_groups_without_reference": self.skipped_no_reference,
            "overall": self.overall.to_json(),
            "by_group": {k: t.to_json() for k, t in self.by_group.items()},
        }


def _number(value: Any) -> float | None:
    # NaN never wins a comparison: a candidate without a usable score is treated as unscored.
    return None if value is None or value != value else float(value)


def evaluate_rows(
    rows: Iterable[dict[str, Any]],
    *,
    answer_column: str,
    response_column: str = "response",
    group_by: str | None = None,
    pattern: re.Pattern[str] | None = None,
) -> tuple[Tally, dict[str, Tally], int]:
    """Tallies of output-table rows (dicts), overall and per ``group_by`` value."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    overall, by_group, skipped = Tally(), {}, 0
    for gid, members in groups.items():
        reference = _one_value(gid, members, answer_column)
        key = answer_key(None if reference is None else str(reference))
        if key is None:
            skipped += 1
            continue
        candidates = []
        for row in sorted(
            (r for r in members if r["candidate_index"] is not None), key=lambda r: r["candidate_index"]
        ):
            scored = row["error"] is None and _number(row["score"]) is not None
            candidates.append(
                Candidate(
                    index=row["candidate_index"],
                    answer=answer_key(extract_answer(row[response_column], pattern)),
                    score=_number(row["score"]) if scored else None,
                    score_min=_number(row["score_min"]) if scored else None,
                    score_last=_number(row["score_last"]) if scored else None,
                )
            )
        verdict = judge(key, candidates)
        overall.add(candidates, verdict)
        if group_by is not None:
            value = _one_value(gid, members, group_by)
            by_group.setdefault(NULL_GROUP if value is None else str(value), Tally()).add(candidates, verdict)
    return overall, dict(sorted(by_group.items())), skipped


def _one_value(gid: Any, members: Sequence[dict[str, Any]], column: str) -> Any:
    """The group's single value of ``column``; rows of one group that disagree are an input error."""
    values = {repr(r[column]): r[column] for r in members if r[column] is not None}
    if len(values) > 1:
        raise EvalInputError(
            f"group {gid!r} has different {column!r} values on its rows ({sorted(values)[:3]}); "
            "the column must be constant within a group"
        )
    return next(iter(values.values()), None)


# ----------------------------------------------------------------------------------------------
# Reading the output table, printing, the command
# ----------------------------------------------------------------------------------------------


def read_output(uri: str, columns: Sequence[str], *, allow_incomplete: bool = False) -> list[dict[str, Any]]:
    """The rows (as dicts of ``columns``) of a job's output: a directory/prefix, glob or one file."""
    import pyarrow as pa

    from visualprm_ray.evaluate._io import exists, join_uri
    from visualprm_ray.storage import fsspec_filesystem, list_files, parallel_map, read_parquet

    fs, path = fsspec_filesystem(uri)
    try:
        # The job's own files, listed as its count check lists them; nested ones are not its.
        listing = list_files(uri, recursive=False, detail=True)
    except FileNotFoundError as exc:
        raise EvalInputError(f"no output table at {uri}") from exc
    is_directory = not any(ch in path for ch in "*?[") and not fs.isfile(path)
    # A run is finished only once _SUCCESS is written (README): a partial table gives wrong numbers.
    if is_directory and not allow_incomplete and not exists(join_uri(uri, "_SUCCESS")):
        raise EvalInputError(
            f"{uri} has no _SUCCESS marker: the run is unfinished (or pass --allow-incomplete)"
        )
    if not listing:
        raise EvalInputError(f"no Parquet files at {uri}")
    wanted = list(dict.fromkeys(columns))
    # Many files at once and only the wanted columns' chunks, as the count check reads them.
    tables = parallel_map(
        lambda i: read_parquet(listing[i][0], wanted, size=listing[i][1], missing_columns="skip"),
        len(listing),
    )
    table = pa.concat_tables(tables, promote_options="default")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EvalInputError(f"the output table lacks the columns {missing}; it has {table.column_names}")
    return table.select(list(dict.fromkeys(columns))).to_pylist()


_LABELS = {
    "first": "first",
    "best_score": "best score",
    "best_score_min": "best min",
    "best_score_last": "best last",
    "majority": "majority",
    "weighted_vote": "wtd vote",
    "oracle": "oracle",
}


def render_report(report: BoNReport) -> str:
    tallies = {"overall": report.overall, **report.by_group}
    width = max(len(report.group_by or ""), *(len(k) for k in tallies))
    head = f"{report.group_by or '':<{width}}  groups  cands  errored" + "".join(
        f"  {_LABELS[m]:>10}" for m in METHODS
    )
    o = report.overall
    lines = [
        f"Best-of-N accuracy on {report.output}: {o.groups} groups, {o.candidates} candidates "
        f"({o.errored_candidates} errored, {o.unanswered_candidates} without an answer)",
        f"answers: {report.extract}; reference column {report.answer_column!r}",
        head,
        "-" * len(head),
    ]
    for name, t in tallies.items():
        acc = t.accuracy()
        cells = "".join(f"  {'-' if acc[m] is None else f'{100 * acc[m]:.1f}%':>10}" for m in METHODS)
        lines.append(f"{name:<{width}}  {t.groups:>6}  {t.candidates:>5}  {t.errored_candidates:>7}{cells}")
    if report.skipped_no_reference:
        lines.append(f"skipped {report.skipped_no_reference} group(s) without a reference answer")
    return "\n".join(lines)


def run_eval_bon(
    output: str,
    *,
    answer_column: str = "answer",
    response_column: str = "response",
    group_by: str | None = None,
    extract: str | None = None,
    json_path: str | None = None,
    allow_incomplete: bool = False,
    emit: Callable[[str], None] = print,
) -> BoNReport:
    """Best-of-N accuracy of the output table at ``output``; prints a table, writes ``json_path``."""
    from visualprm_ray.evaluate._io import write_bytes
    from visualprm_ray.storage import redact

    try:
        pattern = None if extract is None else re.compile(extract)
    except re.error as exc:
        raise EvalInputError(f"--extract is not a valid regular expression: {exc}") from exc
    columns = ["id", "candidate_index", response_column, answer_column, "score", "score_min", "score_last"]
    columns += ["error", *([group_by] if group_by else [])]
    rows = read_output(output, columns, allow_incomplete=allow_incomplete)
    candidates = [r for r in rows if r["candidate_index"] is not None]
    if candidates and all(r[response_column] is None for r in candidates):
        raise EvalInputError(
            f"every {response_column!r} is null: no answer to extract (was output.include_response off?)"
        )
    overall, by_group, skipped = evaluate_rows(
        rows, answer_column=answer_column, response_column=response_column, group_by=group_by, pattern=pattern
    )
    report = BoNReport(
        output=redact(output),
        answer_column=answer_column,
        response_column=response_column,
        group_by=group_by,
        extract=DEFAULT_EXTRACT if extract is None else f"last match of {extract}",
        overall=overall,
        by_group=by_group,
        skipped_no_reference=skipped,
    )
    emit(render_report(report))
    if json_path is not None:
        write_bytes(json_path, json.dumps(report.to_json(), indent=2).encode())
        emit(f"\nwrote {json_path}")
    return report
