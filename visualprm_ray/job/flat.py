"""The flat layout's regroup pass: candidate rows -> group rows in ``<output>/_regrouped/``, once.

A flat input holds one row per candidate; ranks need the whole group, and a group's rows may be
anywhere in the input. So before scoring, one Ray Data pass shuffles the rows by id, without their
images (:mod:`visualprm_ray.job.stages.regroup`), into as many partitions as the input's size asks
for, joins each group's image back, and writes the group rows as Parquet under ``_regrouped/``.
The scoring pass then reads those files like a grouped input.

The pass is resumable as a whole: it ends by writing ``_regrouped/_SUCCESS`` with a record of the
input it regrouped (files, rows, bytes) and the column settings. A rerun of the job with the same
input reuses it and goes straight to scoring; anything else clears it and regroups again. A
finished job removes it (readers of the output never see it: the name starts with ``_``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import TYPE_CHECKING

from visualprm_ray.job import stages as col
from visualprm_ray.job.inputs import InputFile, ReadPlan

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig

REGROUPED = "_regrouped"
MARKER = "_SUCCESS"
# Bytes (uncompressed, images left out) per shuffle partition: enough rows per partition to keep the
# shuffle's task count reasonable at 100M rows, small enough that a partition fits a worker easily.
PARTITION_BYTES = 128 << 20
MAX_PARTITIONS = 4096


def regrouped_uri(config: JobConfig) -> str:
    return f"{config.output.uri.rstrip('/')}/{REGROUPED}"


def num_partitions(plan: ReadPlan, image_column: str, cpus: int = 1) -> int:
    """Shuffle partitions for the light columns: from the input's size (and at least one per CPU,
    so that a small input is still regrouped by every core), not a fixed number."""
    light = sum(size for f in plan.files for name, size in f.column_bytes if name != image_column)
    return max(1, min(MAX_PARTITIONS, max(math.ceil(light / PARTITION_BYTES), cpus)))


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def _record(config: JobConfig, plan: ReadPlan) -> dict:
    files = [(uri, f.num_rows, sum(f.row_group_bytes)) for uri, f in zip(plan.uris, plan.files, strict=True)]
    inp = config.input.model_dump(mode="json", exclude={"uri", "num_blocks"})
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"input_files": len(files), "input_digest": digest, "input": inp}


def regroup_dataset(config: JobConfig, plan: ReadPlan):
    """The lazy regroup pass: flat rows (images left out) -> group rows with their image joined back."""
    import pyarrow as pa
    import ray

    from visualprm_ray.job.stages.read import InputGroups, Rename
    from visualprm_ray.job.stages.regroup import JoinImages, flat_to_group

    inp = config.input
    image = inp.image_column if inp.image_column in plan.schema.names else None
    light = [f for f in plan.schema if f.name != image]
    source = InputGroups(
        plan.files,
        config.storage,
        schema=pa.schema(light),
        rows_per_block=max(1024, config.runtime.groups_per_batch * 16),
        row_positions=True,
    )
    ds = ray.data.read_datasource(source)
    ds = ds.map_batches(Rename(config, plan), batch_format="pyarrow", zero_copy_batch=True)
    ds = ds.drop_columns([col.IMAGE])  # Rename adds a null image column; the real one joins later
    partitions = num_partitions(plan, inp.image_column, _cluster_cpus())
    ds = ds.groupby(col.ID, num_partitions=partitions).map_groups(
        flat_to_group,
        batch_format="pyarrow",
        fn_kwargs={
            "passthrough": [f.name for f in plan.passthrough if f.name != image],
            "has_steps": plan.has_steps,
            "has_index": plan.candidate_index_column is not None,
            "with_image": image is not None,
        },
    )
    # map_groups concatenates one-row tables: one Arrow chunk per group. Made contiguous in the same
    # task, the sort and the join below ran 6x and the shuffle 3x faster (1M rows, docs/PERFORMANCE.md).
    ds = ds.map_batches(_contiguous, batch_format="pyarrow", batch_size=None)
    if image is None:
        return ds.map_batches(_null_images, batch_format="pyarrow")
    ds = ds.sort([col.IMAGE_FILE, col.IMAGE_ROW])
    return ds.map_batches(
        JoinImages(
            ray.put(plan.files),
            config.storage,
            column=image,
            image_type=plan.schema.field(image).type,
            # input.keep_image_bytes: the image is also a passthrough column, one copy per candidate.
            passthrough=image if any(f.name == image for f in plan.passthrough) else None,
        ),
        batch_format="pyarrow",
    )


def _contiguous(table):
    return table.combine_chunks()


def _null_images(table):
    import pyarrow as pa

    return table.append_column(col.IMAGE, pa.nulls(len(table), pa.binary()))


def regrouped_plan(config: JobConfig, plan: ReadPlan, *, emit=print) -> tuple[ReadPlan, int]:
    """The plan of the regrouped group rows (and how many groups), regrouping first unless an
    earlier attempt already did it for this very input."""
    from visualprm_ray.job.inputs import keep_footer, read_footers
    from visualprm_ray.storage import fsspec_filesystem, list_files, pyarrow_filesystem, redact

    uri = regrouped_uri(config)
    fs, path = fsspec_filesystem(uri, config.storage)
    record = _record(config, plan)
    done = None
    if fs.exists(f"{path}/{MARKER}"):
        try:
            done = json.loads(fs.cat_file(f"{path}/{MARKER}"))
        except ValueError:
            done = None
    if done is None or {k: done.get(k) for k in record} != record:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        started = time.time()
        partitions = num_partitions(plan, config.input.image_column, _cluster_cpus())
        emit(
            f"[visualprm-ray] regrouping {plan.num_rows} flat row(s) of {len(plan.files)} file(s) by id "
            f"({partitions} partition(s), images joined after the shuffle) into {redact(uri)}"
        )
        out_fs, out_path = pyarrow_filesystem(uri, config.storage)
        regroup_dataset(config, plan).write_parquet(out_path, filesystem=out_fs)
        listing = list_files(uri, config.storage, recursive=False, detail=True)
        groups = sum(m.num_rows for m, _ in read_footers(listing, config))
        with fs.open(f"{path}/{MARKER}", "w") as f:
            json.dump({**record, "groups": groups, "seconds": time.time() - started}, f)
        emit(f"[visualprm-ray] regrouped into {groups} group(s) in {time.time() - started:.1f}s")
    else:
        listing = list_files(uri, config.storage, recursive=False, detail=True)
        groups = int(done["groups"])
        emit(f"[visualprm-ray] reusing the regrouped input of an earlier attempt ({groups} group(s))")
    footers = read_footers(listing, config)
    files = [
        InputFile.from_metadata(u, m, size=size, footer=keep_footer(m))
        for (u, size, _), (m, _) in zip(listing, footers, strict=True)
    ]
    schema = footers[0][1] if footers else None
    return (
        ReadPlan(
            uris=[u for u, _, _ in listing],
            files=files,
            layout="flat",
            passthrough=plan.passthrough,
            has_id=True,
            has_steps=plan.has_steps,
            candidate_index_column=None,
            schema=schema,
            internal=True,
        ),
        groups,
    )


def clear(config: JobConfig) -> None:
    """Remove the regrouped rows (a finished job, or ``output.mode: overwrite``)."""
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(regrouped_uri(config), config.storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
