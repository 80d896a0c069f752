"""The scoring job, top to bottom: read -> prepare -> score -> aggregate -> write.

:func:`build_dataset` only composes lazy Ray Data operators (no I/O, no side effects);
:func:`run_job` is the driver: it connects to Ray, sizes the actor pools, runs the dataset into the
output, and writes the manifest and ``_SUCCESS`` last, so readers know a run is complete.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from visualprm_ray.layout import Resources, plan_resources, usable_cores
from visualprm_ray.resume import JOB_RECORD, Committed, output_files
from visualprm_ray.stages.aggregate import aggregate
from visualprm_ray.stages.prepare import PrepareStage
from visualprm_ray.stages.read import InputFile, ReadPlan, plan_read, read_groups
from visualprm_ray.stages.score import ScoreStage
from visualprm_ray.stages.write import ExplodeToCandidates

if TYPE_CHECKING:
    from visualprm_ray.config import JobConfig

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


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


def build_dataset(
    config: JobConfig,
    plan: ReadPlan,
    resources: Resources,
    files: list[InputFile],
    *,
    progress: str | None = None,
    journal: str | None = None,
    skip_ids=None,
):
    """The lazy dataset of output rows (candidate rows in the output schema).

    ``files`` are the input files with their row groups, from :func:`count_input`;
    ``journal`` names the crash journal actor (poison-row isolation, :mod:`visualprm_ray.journal`);
    ``skip_ids`` is an object-store reference to the ids already committed (resume).
    """
    from ray.data import ActorPoolStrategy

    from visualprm_ray import faults

    rt = config.runtime
    fault_env = faults.forwarded_env()
    rows = sum(sum(f.row_group_rows) for f in files)
    ds = read_groups(
        config, plan, files, rows_per_block=rows_per_block(config, plan, rows), skip_ids=skip_ids
    )
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs={"config": config, "model_dir": config.model.source, "progress": progress},
        compute=ActorPoolStrategy(min_size=1, max_size=resources.num_preparers),
        num_cpus=rt.cpus_per_preparer,
        batch_size=rt.groups_per_batch,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            "config": config,
            "model_dir": config.model.source,
            "device": resources.device,
            "cpu_threads": resources.cpu_threads_per_scorer,
            "progress": progress,
            "journal": journal,
        },
        compute=ActorPoolStrategy(size=resources.num_scorers),
        num_cpus=rt.cpus_per_scorer,
        num_gpus=resources.gpus_per_scorer,
        batch_size=rt.groups_per_batch,
        batch_format="pyarrow",
        # A dead actor is restarted by Ray (max_restarts=-1 in Ray Data) and its batch retried.
        # Poison groups need up to max_crashes retries each before the journal records them,
        # on top of the retries kept for ordinary failures (a lost node, a preemption).
        max_task_retries=rt.max_task_retries + rt.groups_per_batch * rt.max_crashes_per_group,
        # Test-only fault injection travels to the actors only when the driver has it set.
        **({"runtime_env": {"env_vars": fault_env}} if fault_env else {}),
    )
    ds = ds.map_batches(aggregate, batch_format="pyarrow")
    # An instance (not the class): a plain function for Ray, fused into the write task.
    return ds.map_batches(ExplodeToCandidates(plan, config.output.include_response), batch_format="pyarrow")


# A block never holds more than this many batches' worth of groups: a stage hands a block on only
# once all of it is done, so bigger blocks add memory and latency and nothing else.
MAX_BATCHES_PER_BLOCK = 4
# Flat rows are candidates (regrouped by a shuffle afterwards): this many per group, roughly.
_FLAT_ROWS_PER_GROUP = 16


def rows_per_block(config: JobConfig, plan: ReadPlan, input_rows: int) -> int:
    """Input rows per block.

    One batch of groups by default: the first groups reach the scorer as soon as one batch is
    prepared, and a small input is still spread over every actor. ``input.num_blocks`` spreads
    the input over that many blocks instead, up to :data:`MAX_BATCHES_PER_BLOCK` batches each.
    """
    batch = config.runtime.groups_per_batch * (_FLAT_ROWS_PER_GROUP if plan.layout == "flat" else 1)
    if config.input.num_blocks is None:
        return batch
    return max(1, min(-(-input_rows // config.input.num_blocks), MAX_BATCHES_PER_BLOCK * batch))


def init_ray(config: JobConfig) -> None:
    """Attach to ``runtime.ray_address`` or ``$RAY_ADDRESS``; otherwise start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = config.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    rt = config.runtime
    needed = (rt.num_scorers or 1) * rt.cpus_per_scorer + (rt.num_preparers or 1) * rt.cpus_per_preparer
    # Headroom over the machine's cores: Ray's CPU count is a scheduling token, and the preparers,
    # the read and the write tasks need some while the scorers hold one each (on CPU, one replica
    # per core where the model fits, layout.py).
    # address="local": always a fresh local Ray. A bare ray.init() would attach to whatever
    # cluster `ray start` left on this machine, with other resources and other code.
    ray.init(address="local", num_cpus=max(usable_cores(), math.ceil(needed)) + 2)


def count_input(config: JobConfig, plan: ReadPlan) -> tuple[Counts, list[InputFile]]:
    """Candidates in, from the input files alone (independent of what the pipeline did).

    Also refuses an input whose group ids repeat: resume and the exactly-once check key on the
    id, so two groups with one id could not be told apart. The same pass returns each file's row
    groups, which the read stage cuts its tasks from.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visualprm_ray.storage import pyarrow_filesystem, redact

    counts = Counts()
    inp = config.input
    column = inp.responses_column if plan.layout == "grouped" else inp.id_column
    check_ids = plan.layout == "grouped" and plan.has_id
    seen: dict[str, str] = {}
    files = []
    for uri in plan.files:
        fs, path = pyarrow_filesystem(uri, config.storage)
        columns = [column, inp.id_column] if check_ids else [column]
        with pq.ParquetFile(path, filesystem=fs) as parquet:
            files.append(InputFile.from_metadata(path, parquet.metadata))
            table = parquet.read(columns=columns)
        values = table[column]
        if plan.layout == "grouped":
            lengths = pc.fill_null(pc.list_value_length(values), 0)
            counts.groups_in += len(values)
            counts.candidates_in += int(pc.sum(lengths).as_py() or 0)
            counts.empty_groups += int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        else:
            counts.candidates_in += len(values)
        if check_ids:
            for value in table[inp.id_column].cast("string").to_pylist():
                if value is None:
                    raise ValueError(
                        f"{redact(uri)}: a row has a null {inp.id_column!r}; every group needs an id"
                    )
                if value in seen:
                    raise ValueError(
                        f"group id {value!r} appears more than once ({redact(seen[value])}, {redact(uri)}); "
                        f"resume and the exactly-once check key on {inp.id_column!r}, so ids must be unique"
                    )
                seen[value] = uri
    return counts, files


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


def model_fingerprint(config: JobConfig) -> str:
    from pathlib import Path

    from visualprm_ray.checkpoint import weights_fingerprint

    source = config.model.source
    if Path(source).is_dir():
        return weights_fingerprint(source)
    if "://" in source:
        import hashlib

        from visualprm_ray.storage import fsspec_filesystem

        fs, path = fsspec_filesystem(source, config.storage)
        listing = fs.find(path, detail=True)
        items = sorted(
            (k.rsplit("/", 1)[-1], v.get("size"), v.get("ETag") or v.get("etag"))
            for k, v in listing.items()
            if k.endswith(".safetensors")
        )
        return hashlib.sha256(repr(items).encode()).hexdigest()
    return f"hub:{source}"


def _steady_rate(progress: dict[str, float]) -> float | None:
    """Rows/s between the first and the last scored batch (the first batch's rows excluded)."""
    first, last = progress.get("first_report"), progress.get("last_report")
    if first is None or last is None or last <= first:
        return None
    return (progress["scored"] - progress.get("first_batch", 0)) / (last - first)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("visualprm-ray", "ray", "torch", "transformers", "pyarrow", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# What a run writes into its output directory; an overwrite removes these and nothing else.
JOB_FILES = (MANIFEST, SUCCESS, JOB_RECORD, "_report.html")


def prepare_output(config: JobConfig) -> bool:
    """Apply ``output.mode``; returns False when a complete run is already there (nothing to do).

    ``resume`` keeps an unfinished run's files: :func:`visualprm_ray.resume.scan_committed`
    decides which of them count. ``overwrite`` removes the job's own files (Parquet files and
    the bookkeeping in :data:`JOB_FILES`); anything else a user keeps there is left alone.
    """
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    exists = fs.exists(path) and bool(fs.ls(path))
    if not exists:
        return True
    if config.output.mode == "error":
        raise FileExistsError(f"output {config.output.uri} already holds files (output.mode is 'error')")
    if config.output.mode == "resume":
        return not fs.exists(f"{path}/{SUCCESS}")
    # Top level only: the job writes nothing below it, and a user's nested files are not ours.
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".parquet") or name in JOB_FILES:
            fs.rm(entry)
    return True


def apply_limits(config: JobConfig) -> None:
    """Ray Data's guards against a job that hangs instead of failing (set on the driver)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # No operator making progress for this long (an actor pool that can never be placed, a read
    # that hangs) fails the job with Ray Data's own message, which names the stalled operators.
    # Ray Data turns the guard off for pipelines with all-to-all operators: the grouped layout
    # has none (the read stage sizes its own blocks; no repartition), the flat layout's shuffle is one.
    ctx.execution_no_progress_timeout_s = config.runtime.stall_timeout_s
    # Data problems are rows with errors, never failed blocks: a failed block is a bug.
    ctx.max_errored_blocks = 0


def run_job(config: JobConfig, *, emit=print) -> dict[str, Any]:
    """Run a scoring job to completion and return its manifest.

    Raises :class:`JobCheckError` (after writing the manifest, without ``_SUCCESS``) when the
    output does not hold every input candidate exactly once.
    """
    import pyarrow.parquet  # noqa: F401 - fail early if the Parquet support is missing
    import ray

    from visualprm_ray.journal import start_journal
    from visualprm_ray.progress import ProgressPrinter
    from visualprm_ray.resume import check_job_record, job_record, scan_committed
    from visualprm_ray.storage import fsspec_filesystem, pyarrow_filesystem, redact

    started = time.time()
    if not prepare_output(config):  # before Ray starts: a finished job costs nothing to rerun
        emit(
            f"[visualprm-ray] {redact(config.output.uri)} already holds a complete run ({SUCCESS}); nothing to do"
        )
        fs, path = fsspec_filesystem(config.output.uri, config.storage)
        return json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    init_ray(config)
    apply_limits(config)
    plan = plan_read(config)
    resources = plan_resources(config)
    counts, files = count_input(config, plan)
    fingerprint = model_fingerprint(config)
    check_job_record(config, job_record(config, fingerprint))
    committed = scan_committed(config) if config.output.mode == "resume" else Committed()
    threads = (
        f" ({resources.cpu_threads_per_scorer} thread(s) each)" if resources.cpu_threads_per_scorer else ""
    )
    emit(
        f"[visualprm-ray] {len(plan.files)} file(s), layout {plan.layout}, {counts.candidates_in} candidates; "
        f"{resources.num_scorers} scorer(s) on {resources.device}{threads}, {resources.num_preparers} preparer(s)"
    )
    if committed.files or committed.removed:
        emit(
            f"[visualprm-ray] resuming: {len(committed.ids)} group(s), {committed.candidates} candidate(s) "
            f"already committed in {len(committed.files)} file(s); skipped. Removed "
            f"{len(committed.removed)} torn or duplicate file(s)."
        )
    suffix = uuid.uuid4().hex[:8]
    progress_name, journal_name = f"visualprm-progress-{suffix}", f"visualprm-journal-{suffix}"
    journal = start_journal(journal_name)
    skip_ids = ray.put(committed.id_array()) if committed.ids else None
    out_fs, out_path = pyarrow_filesystem(config.output.uri, config.storage)
    try:
        with ProgressPrinter(
            progress_name,
            config.runtime.progress_interval_s,
            total=counts.candidates_in - committed.candidates,
            emit=emit,
        ) as progress:
            ds = build_dataset(
                config,
                plan,
                resources,
                files,
                progress=progress_name,
                journal=journal_name,
                skip_ids=skip_ids,
            )
            compression = None if config.output.compression == "none" else config.output.compression
            ds.write_parquet(
                out_path,
                filesystem=out_fs,
                min_rows_per_file=config.output.min_rows_per_file,
                compression=compression,
            )
            final = progress.snapshot()
    finally:
        ray.kill(journal)
    finished = time.time()
    counts = count_output(config, counts, committed)
    problems = counts.problems()
    elapsed = finished - started
    manifest = {
        "status": "complete" if not problems else "failed_check",
        "problems": problems,
        "config": config.redacted_dict(),
        "model": {"source": redact(config.model.source), "weights_fingerprint": fingerprint},
        "layout": plan.layout,
        "input_files": [redact(f) for f in plan.files],
        "resources": resources.__dict__,
        "counts": counts.__dict__,
        "resume": {
            "files_kept": len(committed.files),
            "files_removed": [redact(f) for f in committed.removed],
            "groups_skipped": len(committed.ids),
        },
        "timings": {
            "started": started,
            "finished": finished,
            "elapsed_s": elapsed,
            "rows_per_s": counts.scored / elapsed if elapsed else None,
            "tokens_scored": final.get("tokens", 0),
            "tokens_per_s": final.get("tokens", 0) / elapsed if elapsed else None,
            # Start-up (Ray workers, model load) vs the rate once the scorers run.
            "first_result_s": final["first_report"] - started if "first_report" in final else None,
            "steady_rows_per_s": _steady_rate(final),
            # Busy seconds summed over each stage's actors: where the time goes.
            "stage_busy_s": {"prepare": final.get("prepare_s", 0.0), "score": final.get("score_s", 0.0)},
        },
        "versions": _versions(),
    }
    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    with fs.open(f"{path}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    summary = (
        f"{counts.candidates_in} candidates in: {counts.scored} scored, {counts.errored} errored, "
        f"{counts.skipped} skipped (already done)"
    )
    if problems:
        emit(f"[visualprm-ray] FAILED the count check: {summary}; " + "; ".join(problems))
        raise JobCheckError(
            f"output {redact(config.output.uri)} failed the count check: " + "; ".join(problems)
        )
    # Written last: readers of a finished run wait for this marker.
    with fs.open(f"{path}/{SUCCESS}", "w") as f:
        f.write("")
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(counts.errors_by_kind.items()))
    emit(
        f"[visualprm-ray] done in {elapsed:.1f}s: {summary}"
        + (f" [{by_kind}]" if by_kind else "")
        + (f", {counts.empty_groups} group(s) without candidates" if counts.empty_groups else "")
        + f"; {counts.rows_out} rows written ({counts.scored / elapsed:.2f} rows/s) -> {redact(config.output.uri)}"
    )
    return manifest
