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
from typing import TYPE_CHECKING, Any

from visualprm_ray.job.counts import JobCheckError, count_input, count_output
from visualprm_ray.job.inputs import plan_read
from visualprm_ray.job.layout import plan_resources, usable_cores
from visualprm_ray.job.resume import JOB_RECORD, Committed

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig

__all__ = ["MANIFEST", "SUCCESS", "JobCheckError", "run_job"]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


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


def model_fingerprint(config: JobConfig) -> str:
    from pathlib import Path

    from visualprm_ray.model.checkpoint import weights_fingerprint

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

    ``resume`` keeps an unfinished run's files: :func:`visualprm_ray.job.resume.scan_committed`
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

    from visualprm_ray.job.journal import start_journal
    from visualprm_ray.job.pipeline import build_dataset
    from visualprm_ray.job.progress import ProgressPrinter
    from visualprm_ray.job.resume import check_job_record, job_record, scan_committed
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
