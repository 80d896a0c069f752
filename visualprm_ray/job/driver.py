"""The driver of the scoring job, top to bottom (:func:`run_job`).

It applies the output mode, connects to Ray, sizes the actor pools, counts the input, checks the
job record and what an earlier attempt committed, runs the lazy dataset
(:mod:`visualprm_ray.job.pipeline`) into the output, checks that every input candidate came out
exactly once (:mod:`visualprm_ray.job.counts`), and writes the manifest and ``_SUCCESS`` last, so
readers know a run is complete.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from visualprm_ray.job.counts import JobCheckError, RunVerdictError, count_input, count_output, run_verdict
from visualprm_ray.job.inputs import plan_read
from visualprm_ray.job.layout import plan_resources, usable_cores
from visualprm_ray.job.resume import JOB_RECORD, Committed

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig

__all__ = ["MANIFEST", "SUCCESS", "JobCheckError", "RunVerdictError", "run_job"]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_FILES = 1000  # input files listed by name in the manifest


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
    # Token authentication, Ray's own default for a local cluster, stated rather than defaulted:
    # Ray then starts it without a warning nobody can act on in every job log.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(address="local", num_cpus=max(usable_cores(), math.ceil(needed)) + 2)


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

OutputState = Literal["new", "partial", "complete"]


def prepare_output(config: JobConfig) -> OutputState:
    """Apply ``output.mode`` and say what the output holds: nothing yet, an unfinished run, or a
    complete one (``_SUCCESS``; only in ``resume`` mode, where the caller decides what is left).

    ``resume`` keeps an unfinished run's files: :func:`visualprm_ray.job.resume.scan_committed`
    decides which of them count. ``overwrite`` removes the job's own files (Parquet files, the
    bookkeeping in :data:`JOB_FILES` and a flat input's regrouped rows); anything else a user keeps
    there is left alone.
    """
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    exists = fs.exists(path) and bool(fs.ls(path))
    if not exists:
        return "new"
    if config.output.mode == "error":
        raise FileExistsError(f"output {config.output.uri} already holds files (output.mode is 'error')")
    if config.output.mode == "resume":
        return "complete" if fs.exists(f"{path}/{SUCCESS}") else "partial"
    clear_output(config)
    return "new"


def clear_output(config: JobConfig) -> None:
    """Remove the job's own files from the output (Parquet files, :data:`JOB_FILES`, a flat
    input's regrouped rows); anything else a user keeps there is left alone."""
    from visualprm_ray.job import flat
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    # Top level only: the job writes nothing below it, and a user's nested files are not ours.
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".parquet") or name in JOB_FILES:
            fs.rm(entry)
    flat.clear(config)


def _failed_verdict(fs, path: str) -> bool:
    try:
        return json.loads(fs.cat_file(f"{path}/{MANIFEST}")).get("status") == "failed_verdict"
    except FileNotFoundError:
        return False


def input_fingerprint(listing: list[tuple[str, int, str]]) -> str:
    """The input as a listing shows it (names, sizes, ETags or mtimes): a change means new work."""
    import hashlib

    return "sha256:" + hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()


def apply_limits(config: JobConfig) -> None:
    """Ray Data's guards against a job that hangs or dies for nothing (set on the driver)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # No operator making progress for this long (an actor pool that can never be placed, a read
    # that hangs) fails the job with Ray Data's own message, which names the stalled operators.
    # Ray Data turns the guard off for pipelines with all-to-all operators: the scoring pass has
    # none (the read stage sizes its own blocks; no repartition), the flat layout's regroup pass does.
    ctx.execution_no_progress_timeout_s = config.runtime.stall_timeout_s
    # Data problems are rows with errors, never failed blocks: a failed block is a bug.
    ctx.max_errored_blocks = 0
    # An actor whose constructor fails (a throttled model download, a bad GPU) is replaced instead
    # of failing the job; only this many failures in a row, with no actor starting, end it.
    ctx.max_consecutive_actor_init_deaths = config.runtime.max_actor_start_failures


class ActorStartError(RuntimeError):
    """A stage's actors could not start at all; the message carries the actors' own error."""


def _actor_start_failure(exc: BaseException) -> ActorStartError | None:
    """The actors' start-up error behind a failed execution, when that is what ended it."""
    import ray

    from visualprm_ray.storage import redact

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ray.exceptions.ActorDiedError) and "creation task" in str(seen):
            lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
            return ActorStartError(f"the job's actors could not start: {redact(lines[-1])}")
        seen = seen.__cause__ or seen.__context__
    return None


def run_job(config: JobConfig, *, emit=print) -> dict[str, Any]:
    """Run a scoring job to completion and return its manifest.

    Raises :class:`JobCheckError` (after writing the manifest, without ``_SUCCESS``) when the
    output does not hold every input candidate exactly once, :class:`ResumeConflict` when the
    output holds a run with another model or other scoring settings, and :class:`ActorStartError`
    when a stage's actors cannot start at all.
    """
    import pyarrow.parquet  # noqa: F401 - fail early if the Parquet support is missing

    from visualprm_ray.job.preflight import preflight
    from visualprm_ray.job.resume import changes_since_recorded, check_job_record, job_record
    from visualprm_ray.storage import fsspec_filesystem, redact

    started = time.time()
    # Before Ray starts: what the model is (pinned for the whole job), what the input is, and
    # that the output can be written; each problem a SetupError naming what to set.
    identity, listing = preflight(config)
    fingerprint = input_fingerprint(listing)
    state = prepare_output(config)
    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    if state == "partial" and _failed_verdict(fs, path):
        # The earlier attempt finished with nearly every row in error (e.g. images.root unset): a
        # rerun with corrected settings starts over instead of being refused as another job.
        changed = changes_since_recorded(config, job_record(config, identity))
        if changed:
            emit(
                f"[visualprm-ray] the earlier run in {redact(config.output.uri)} failed its verdict and "
                f"the settings changed ({'; '.join(changed)}): starting over"
            )
            clear_output(config)
            state = "new"
    if state != "new":
        # Another model or other settings than the run the output holds: refused before Ray starts.
        check_job_record(config, job_record(config, identity), write=False)
    if state == "complete":
        # A finished run is a no-op only when nothing that matters changed: a changed setting or
        # model was refused above, a changed input is scored like an unfinished run.
        earlier = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
        if earlier.get("input", {}).get("fingerprint") == fingerprint:
            emit(
                f"[visualprm-ray] {redact(config.output.uri)} already holds a complete run of this input "
                f"with these settings ({SUCCESS}); nothing to do"
            )
            return earlier
        emit(
            f"[visualprm-ray] the input changed since the complete run in {redact(config.output.uri)}: "
            "scoring what it does not hold yet"
        )
        fs.rm(f"{path}/{SUCCESS}")
    return _run(config, identity, listing, fingerprint, started, emit)


def _crowded(config: JobConfig, resources) -> str | None:
    """Why the pools may wait: the CPUs free now cannot hold them and a read task beside them.

    The pools are sized from the cluster's total; on a Ray that other work (or an earlier job in
    the same session) still holds part of, the job starts but waits until CPUs free up, and
    ``runtime.stall_timeout_s`` ends it if they never do. Said at the start, not after the timeout.
    """
    import ray

    rt = config.runtime
    needed = resources.num_scorers * rt.cpus_per_scorer + resources.num_preparers * rt.cpus_per_preparer + 1
    free = ray.available_resources().get("CPU", 0.0)
    if free >= needed:
        return None
    return (
        f"{free:g} CPU(s) of the cluster are free now, and the actor pools and a read task need {needed:g}: "
        "the job waits until other work frees them (or nodes join); runtime.num_preparers, "
        "runtime.num_scorers and runtime.cpus_per_preparer make the pools smaller"
    )


def _run(config: JobConfig, identity, listing, fingerprint: str, started: float, emit) -> dict[str, Any]:
    import ray

    from visualprm_ray.job import flat
    from visualprm_ray.job.journal import start_journal
    from visualprm_ray.job.pipeline import build_dataset
    from visualprm_ray.job.progress import ProgressPrinter
    from visualprm_ray.job.resume import check_job_record, input_ids, job_record, plan_skips, scan_committed
    from visualprm_ray.job.stages.write import rows_per_file
    from visualprm_ray.storage import fsspec_filesystem, pyarrow_filesystem, redact

    init_ray(config)
    apply_limits(config)
    plan = plan_read(config, listing)
    resources = plan_resources(config)
    counts, ids = count_input(config, plan)
    check_job_record(config, job_record(config, identity))
    committed = scan_committed(config) if config.output.mode == "resume" else Committed()
    threads = (
        f" ({resources.cpu_threads_per_scorer} thread(s) each)" if resources.cpu_threads_per_scorer else ""
    )
    grows = (
        f" (up to {resources.max_scorers} as nodes join)"
        if resources.max_scorers and resources.max_scorers > resources.num_scorers
        else ""
    )
    crowded = _crowded(config, resources)
    if crowded:
        emit(f"[visualprm-ray] warning: {crowded}")
    emit(
        f"[visualprm-ray] {len(plan.files)} file(s), layout {plan.layout}, {counts.candidates_in} candidates; "
        f"{resources.num_scorers} scorer(s){grows} on {resources.device}{threads}, "
        f"{resources.num_preparers} preparer(s)"
    )
    if committed.files or committed.removed:
        emit(
            f"[visualprm-ray] resuming: {committed.groups} group(s), {committed.candidates} candidate(s) "
            f"already committed in {len(committed.files)} file(s); skipped. Removed "
            f"{len(committed.removed)} torn or duplicate file(s)."
        )
    score_plan = plan
    if plan.layout == "flat":
        score_plan, counts.groups_in = flat.regrouped_plan(config, plan, emit=emit)
    # What an earlier attempt committed is never read again: whole files and row groups are left
    # out of the read tasks, and the rest's committed rows dropped by bitmaps decided here.
    skip = {}
    if committed.groups:
        skip = plan_skips(
            score_plan, input_ids(config, score_plan, ids if score_plan is plan else None), committed
        )
    del ids
    left = sum(
        n
        for i, f in enumerate(score_plan.files)
        for g, n in enumerate(f.row_group_rows)
        if i not in skip or g not in skip[i].row_groups
    )
    suffix = uuid.uuid4().hex[:8]
    progress_name, journal_name = f"visualprm-progress-{suffix}", f"visualprm-journal-{suffix}"
    journal = start_journal(journal_name)
    out_fs, out_path = pyarrow_filesystem(config.output.uri, config.storage)
    final: dict[str, float] = {}
    scorers: dict[str, str] = {}  # the scoring actors that started: actor id -> node id
    try:
        with ProgressPrinter(
            progress_name,
            config.runtime.progress_interval_s,
            total=counts.candidates_in - committed.candidates,
            emit=emit,
        ) as progress:
            if left:  # a resume of a run whose every group was committed starts no actor at all
                emit(
                    "[visualprm-ray] note: Ray logs that each actor 'has constructor arguments in the object "
                    "store'; expected here: this driver holds them for the whole job, so restarts work"
                )
                ds = build_dataset(
                    config,
                    score_plan,
                    resources,
                    model_identity=identity,
                    progress=progress_name,
                    journal=journal_name,
                    skip=skip,
                )
                compression = None if config.output.compression == "none" else config.output.compression
                try:
                    ds.write_parquet(
                        out_path,
                        filesystem=out_fs,
                        min_rows_per_file=rows_per_file(config, score_plan, counts.candidates_in),
                        compression=compression,
                    )
                except Exception as exc:
                    failure = _actor_start_failure(exc)
                    if failure is None:
                        raise
                    raise failure from exc
            final = progress.snapshot()
            scorers = progress.started_actors().get("score", {})
    finally:
        ray.kill(journal)
    finished = time.time()
    counts = count_output(config, counts, committed)
    problems = counts.problems()
    verdict = run_verdict(counts, config.runtime.max_errored_fraction)
    elapsed = finished - started
    manifest = {
        "status": "failed_check" if problems else ("failed_verdict" if verdict else "complete"),
        "problems": problems,
        "verdict": verdict,
        "config": config.redacted_dict(),
        "model": {
            "source": redact(config.model.source),
            "identity": identity.digest,
            "identity_kind": identity.kind,
            "revision": identity.revision,
        },
        "layout": plan.layout,
        # The first files only: the manifest of a 100,000-file input stays small.
        "input": {
            "fingerprint": fingerprint,
            "file_count": len(plan.uris),
            "files": [redact(f) for f in plan.uris[:MANIFEST_FILES]],
        },
        # What ran, beside what was planned: a pool that grew, or restarted actors, show here.
        "resources": {
            **resources.__dict__,
            "scorers_started": len(scorers),
            "scorer_nodes": len(set(scorers.values())),
        },
        "counts": counts.__dict__,
        "resume": {
            "files_kept": len(committed.files),
            "files_removed": [redact(f) for f in committed.removed],
            "groups_skipped": committed.groups,
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
    if verdict:
        emit(f"[visualprm-ray] FAILED: {summary}; {verdict['message']}")
        raise RunVerdictError(f"{redact(config.output.uri)}: {verdict['message']}")
    # Written last: readers of a finished run wait for this marker.
    with fs.open(f"{path}/{SUCCESS}", "w") as f:
        f.write("")
    flat.clear(config)  # the regrouped rows served this run; a rerun with a changed input regroups anew
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(counts.errors_by_kind.items()))
    emit(
        f"[visualprm-ray] done in {elapsed:.1f}s: {summary}"
        + (f" [{by_kind}]" if by_kind else "")
        + (f", {counts.empty_groups} group(s) without candidates" if counts.empty_groups else "")
        + f"; {counts.rows_out} rows written ({counts.scored / max(elapsed, 1e-9):.2f} rows/s) -> {redact(config.output.uri)}"
    )
    return manifest
