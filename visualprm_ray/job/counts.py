"""Candidates in and out, and the check that every input candidate came out exactly once.

What went in is counted from the input files alone, and what came out from the output files alone,
never from what the pipeline says it did: the check is independent of the code it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from visualprm_ray.job.inputs import ReadPlan
from visualprm_ray.job.resume import Committed, output_files

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig


@dataclass
class Counts:
    """What went in and what came out; ``in == scored + errored + skipped`` or the job fails.

    ``scored``, ``errored`` and the breakdowns count candidate rows written by this attempt;
    ``skipped`` counts candidates committed by earlier attempts (resume). Groups without any
    candidate leave one error row each (``empty_groups``), outside the candidate equation.
    """

    groups_in: int = 0
    candidates_in: int = 0
    empty_groups: int = 0
    skipped: int = 0
    scored: int = 0
    errored: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0  # rows written by this attempt (candidate rows + empty-group rows)
    rows_total: int = 0  # rows in the output, earlier attempts included
    duplicates: int = 0  # (id, candidate_index) keys found more than once in the output
    missing: int = 0  # candidates of the input with no output row
    empty_group_rows: int = 0  # output rows of groups without candidates, all attempts

    def problems(self) -> list[str]:
        """Why the output cannot be trusted; empty when it can."""
        out = []
        if self.candidates_in != self.scored + self.errored + self.skipped:
            out.append(
                f"candidates in ({self.candidates_in}) != scored ({self.scored}) + errored "
                f"({self.errored}) + skipped ({self.skipped})"
            )
        if self.duplicates:
            out.append(f"{self.duplicates} candidate row(s) written more than once")
        if self.missing:
            out.append(f"{self.missing} candidate(s) of the input have no output row")
        if self.empty_group_rows != self.empty_groups:
            out.append(
                f"{self.empty_groups} group(s) without candidates in the input, "
                f"{self.empty_group_rows} such row(s) in the output"
            )
        return out


class JobCheckError(RuntimeError):
    """The output failed the count check: rows lost or doubled. Never silently accepted."""


def count_input(config: JobConfig, plan: ReadPlan) -> Counts:
    """Candidates in, from the input files alone (independent of what the pipeline did).

    Flat rows are candidates: the footers' row counts say how many. Grouped rows hold lists, whose
    lengths only the data says: each file's responses column is read (many files at once).

    Also refuses an input whose group ids repeat (or are null): resume and the exactly-once check
    key on the id, so two groups with one id could not be told apart. Ids derived for inputs
    without an id column (file path and row position) cannot repeat.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = Counts()
    if plan.layout == "flat":
        counts.candidates_in = plan.num_rows
        return counts
    inp = config.input
    check_ids = plan.has_id
    columns = [inp.responses_column, *([inp.id_column] if check_ids else [])]
    ids: list[pa.Array] = []
    owners: list[np.ndarray] = []
    for index, table in enumerate(read_columns(config, plan, columns)):
        lengths = pc.fill_null(pc.list_value_length(table[inp.responses_column]), 0)
        counts.groups_in += len(table)
        counts.candidates_in += int(pc.sum(lengths).as_py() or 0)
        counts.empty_groups += int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        if check_ids:
            ids.append(table[inp.id_column].combine_chunks().cast(pa.string()))
            owners.append(np.full(len(table), index, dtype=np.int32))
    if check_ids and ids:
        _check_unique_ids(config, plan, pa.concat_arrays(ids), np.concatenate(owners))
    return counts


def read_columns(config: JobConfig, plan: ReadPlan, columns: list[str]):
    """Each input file's ``columns`` as a table, in file order, several files fetched at once."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from visualprm_ray.job.inputs import FOOTER_THREADS
    from visualprm_ray.storage import pyarrow_filesystem, redact, with_retries

    fs, _ = pyarrow_filesystem(plan.uris[0], config.storage)

    def read(i: int):
        return with_retries(
            lambda: pq.read_table(plan.files[i].path, filesystem=fs, columns=columns),
            what=f"reading {redact(plan.uris[i])}",
            retries=config.storage.retries,
        )

    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(plan.files))) as pool:
        yield from pool.map(read, range(len(plan.files)))


def _check_unique_ids(config: JobConfig, plan: ReadPlan, ids, owners) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from visualprm_ray.storage import redact

    name = config.input.id_column
    if ids.null_count:
        first = int(pc.index(pc.is_null(ids), True).as_py())
        raise ValueError(
            f"{redact(plan.uris[owners[first]])}: a row has a null {name!r}; every group needs an id"
        )
    table = pa.table({"id": ids, "n": pa.array(owners)})
    repeated = table.group_by("id").aggregate([("n", "count")]).filter(pc.greater(pc.field("n_count"), 1))
    if len(repeated):
        value = repeated["id"][0].as_py()
        where = sorted({int(owners[i]) for i in pc.indices_nonzero(pc.equal(ids, value)).to_pylist()})
        files = ", ".join(redact(plan.uris[w]) for w in where[:2])
        raise ValueError(
            f"group id {value!r} appears more than once ({files}); resume and the exactly-once check key "
            f"on {name!r}, so ids must be unique ({len(repeated)} id(s) repeat)"
        )


def count_output(config: JobConfig, counts: Counts, committed: Committed) -> Counts:
    """Fill in what came out, from the output files alone, and check it against what went in."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visualprm_ray.storage import pyarrow_filesystem

    earlier = set(committed.files)
    keys: list[pa.Table] = []
    ids: set[str] = set()
    for uri in output_files(config):
        fs, path = pyarrow_filesystem(uri, config.storage)
        table = pq.read_table(
            path, filesystem=fs, columns=["id", "candidate_index", "error", "error_kind", "error_stage"]
        )
        counts.rows_total += len(table)
        ids.update(table["id"].to_pylist())
        candidates = table.filter(pc.is_valid(table["candidate_index"]))
        counts.empty_group_rows += len(table) - len(candidates)
        keys.append(candidates.select(["id", "candidate_index"]))
        if uri in earlier:
            counts.skipped += len(candidates)
            continue
        counts.rows_out += len(table)
        errored = candidates.filter(pc.is_valid(candidates["error"]))
        counts.errored += len(errored)
        counts.scored += len(candidates) - len(errored)
        for stage, kind in zip(
            errored["error_stage"].to_pylist(), errored["error_kind"].to_pylist(), strict=True
        ):
            counts.errors_by_stage[stage] = counts.errors_by_stage.get(stage, 0) + 1
            counts.errors_by_kind[kind] = counts.errors_by_kind.get(kind, 0) + 1
    if keys:
        all_keys = pa.concat_tables(keys)
        distinct = all_keys.group_by(["id", "candidate_index"]).aggregate([]).num_rows
        counts.duplicates = len(all_keys) - distinct
        counts.missing = max(0, counts.candidates_in - distinct)
    else:
        counts.missing = counts.candidates_in
    counts.groups_in = counts.groups_in or len(ids)
    return counts
