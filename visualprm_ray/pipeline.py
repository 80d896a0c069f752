"""The scoring job, top to bottom: read -> prepare -> score -> aggregate -> write.

:func:`build_dataset` only composes lazy Ray Data operators (no I/O, no side effects);
:func:`run_job` is the driver: it connects to Ray, sizes the actor pools, runs the dataset into the
output, and writes the manifest and ``_SUCCESS`` last, so readers know a run is complete.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from visualprm_ray.stages.aggregate import aggregate
from visualprm_ray.stages.prepare import PrepareStage
from visualprm_ray.stages.read import ReadPlan, plan_read, read_groups
from visualprm_ray.stages.score import ScoreStage
from visualprm_ray.stages.write import ExplodeToCandidates

if TYPE_CHECKING:
    from visualprm_ray.config import JobConfig

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class Resources:
    """How the job is laid out on the cluster, decided by the driver from the config and the cluster."""

    device: str
    num_scorers: int
    gpus_per_scorer: float
    num_preparers: int
    num_blocks: int


@dataclass
class Counts:
    groups_in: int = 0
    candidates_in: int = 0
    empty_groups: int = 0
    rows_out: int = 0
    scored: int = 0
    errored: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)


def build_dataset(config: JobConfig, plan: ReadPlan, resources: Resources, *, progress: str | None = None):
    """The lazy dataset of output rows (candidate rows in the output schema)."""
    from ray.data import ActorPoolStrategy

    rt = config.runtime
    ds = read_groups(config, plan, num_blocks=resources.num_blocks)
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
            "progress": progress,
        },
        compute=ActorPoolStrategy(size=resources.num_scorers),
        num_cpus=rt.cpus_per_scorer,
        num_gpus=resources.gpus_per_scorer,
        batch_size=rt.groups_per_batch,
        batch_format="pyarrow",
        max_task_retries=rt.max_task_retries,
    )
    ds = ds.map_batches(aggregate, batch_format="pyarrow")
    # An instance (not the class): a plain function for Ray, fused into the write task.
    return ds.map_batches(ExplodeToCandidates(plan, config.output.include_response), batch_format="pyarrow")


def plan_resources(config: JobConfig) -> Resources:
    import ray

    rt = config.runtime
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    device = rt.device if rt.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise RuntimeError("runtime.device is 'cuda' but the Ray cluster has no GPUs")
    num_scorers = rt.num_scorers or (max(1, int(gpus / rt.gpus_per_scorer)) if device == "cuda" else 1)
    # Leave CPUs for the read tasks: an actor pool holding every CPU starves them and the job hangs.
    spare = max(cpus - num_scorers * rt.cpus_per_scorer - 1, rt.cpus_per_preparer)
    # Preparing a group (tiling ~13 images' worth of pixels, tokenizing) costs a fraction of scoring
    # it, so two preparers per scorer keep the scorers fed; more would only compete for cores.
    num_preparers = rt.num_preparers or max(1, min(int(spare / rt.cpus_per_preparer), 2 * num_scorers))
    return Resources(
        device=device,
        num_scorers=num_scorers,
        gpus_per_scorer=rt.gpus_per_scorer if device == "cuda" else 0,
        num_preparers=num_preparers,
        num_blocks=config.input.num_blocks or max(2 * (num_preparers + num_scorers), 4),
    )


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
    # Headroom over the machine's cores: Ray's CPU count is a scheduling token, and the read and
    # write tasks need some while both actor pools hold theirs.
    # address="local": always a fresh local Ray. A bare ray.init() would attach to whatever
    # cluster `ray start` left on this machine, with other resources and other code.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed) + 2))


def count_input(config: JobConfig, plan: ReadPlan) -> Counts:
    """Candidates in, from the input files alone (independent of what the pipeline did)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visualprm_ray.storage import pyarrow_filesystem

    counts = Counts()
    column = config.input.responses_column if plan.layout == "grouped" else config.input.id_column
    for uri in plan.files:
        fs, path = pyarrow_filesystem(uri, config.storage)
        values = pq.read_table(path, filesystem=fs, columns=[column])[column]
        if plan.layout == "grouped":
            lengths = pc.fill_null(pc.list_value_length(values), 0)
            counts.groups_in += len(values)
            counts.candidates_in += int(pc.sum(lengths).as_py() or 0)
            counts.empty_groups += int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        else:
            counts.candidates_in += len(values)
            counts.groups_in += 0  # distinct ids are counted from the output
    return counts


def count_output(config: JobConfig, counts: Counts) -> Counts:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visualprm_ray.storage import list_files, pyarrow_filesystem

    ids = set()
    for uri in list_files(config.output.uri, config.storage):
        fs, path = pyarrow_filesystem(uri, config.storage)
        table = pq.read_table(path, filesystem=fs, columns=["id", "error", "error_stage"])
        counts.rows_out += len(table)
        errored = pc.is_valid(table["error"])
        counts.errored += int(pc.sum(errored).as_py() or 0)
        for stage, error in zip(
            table["error_stage"].filter(errored).to_pylist(),
            table["error"].filter(errored).to_pylist(),
            strict=True,
        ):
            counts.errors_by_stage[stage] = counts.errors_by_stage.get(stage, 0) + 1
            kind = error.split(":", 1)[0]
            counts.errors_by_kind[kind] = counts.errors_by_kind.get(kind, 0) + 1
        ids.update(table["id"].to_pylist())
    counts.scored = counts.rows_out - counts.errored
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


def prepare_output(config: JobConfig) -> bool:
    """Apply ``output.mode``; returns False when a complete run is already there (nothing to do)."""
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    exists = fs.exists(path) and bool(fs.ls(path))
    if not exists:
        return True
    if config.output.mode == "error":
        raise FileExistsError(f"output {config.output.uri} already holds files (output.mode is 'error')")
    complete = fs.exists(f"{path}/{SUCCESS}")
    if config.output.mode == "resume" and complete:
        return False
    # 'overwrite', or an incomplete earlier run: start clean so no row is written twice. Only the
    # job's own files go; anything else a user keeps there is left alone.
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".parquet") or name in (MANIFEST, SUCCESS):
            fs.rm(entry)
    return True


def run_job(config: JobConfig, *, emit=print) -> dict[str, Any]:
    """Run a scoring job to completion and return its manifest."""
    import pyarrow.parquet  # noqa: F401 - fail early if the Parquet support is missing
    import ray

    from visualprm_ray.progress import ProgressPrinter
    from visualprm_ray.storage import fsspec_filesystem, pyarrow_filesystem, redact

    started = time.time()
    init_ray(config)
    if not prepare_output(config):
        emit(f"[visualprm-ray] {config.output.uri} already holds a complete run ({SUCCESS}); nothing to do")
        fs, path = fsspec_filesystem(config.output.uri, config.storage)
        return json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    plan = plan_read(config)
    resources = plan_resources(config)
    counts = count_input(config, plan)
    emit(
        f"[visualprm-ray] {len(plan.files)} file(s), layout {plan.layout}, {counts.candidates_in} candidates; "
        f"{resources.num_scorers} scorer(s) on {resources.device}, {resources.num_preparers} preparer(s)"
    )
    progress_name = f"visualprm-progress-{uuid.uuid4().hex[:8]}"
    out_fs, out_path = pyarrow_filesystem(config.output.uri, config.storage)
    with ProgressPrinter(
        progress_name, config.runtime.progress_interval_s, total=counts.candidates_in, emit=emit
    ) as progress:
        ds = build_dataset(config, plan, resources, progress=progress_name)
        compression = None if config.output.compression == "none" else config.output.compression
        ds.write_parquet(
            out_path,
            filesystem=out_fs,
            min_rows_per_file=config.output.min_rows_per_file,
            compression=compression,
        )
        final = progress.snapshot()
    finished = time.time()
    counts = count_output(config, counts)
    elapsed = finished - started
    manifest = {
        "status": "complete",
        "config": config.redacted_dict(),
        "model": {"source": redact(config.model.source), "weights_fingerprint": model_fingerprint(config)},
        "layout": plan.layout,
        "input_files": [redact(f) for f in plan.files],
        "resources": resources.__dict__,
        "counts": counts.__dict__,
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
    # Written last: readers of a finished run wait for this marker.
    with fs.open(f"{path}/{SUCCESS}", "w") as f:
        f.write("")
    emit(
        f"[visualprm-ray] done in {elapsed:.1f}s: {counts.candidates_in} candidates in, {counts.scored} scored, "
        f"{counts.errored} errored, {counts.rows_out} rows written ({counts.scored / elapsed:.2f} rows/s) "
        f"-> {redact(config.output.uri)}"
    )
    del ray
    return manifest
