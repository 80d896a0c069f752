"""The export's driver: a finished scores output + its input -> a training dataset, on Ray.

One Ray Data pass, at the job's scale:

1. read the scores' light columns and the input's light columns (the texts, and each row's place
   in its file instead of its image) through the job's own reader, ids derived exactly as the
   job derived them;
2. shuffle both by group id (``groupby(id).map_groups``) so each group's rows meet, and select
   what the format asks for (:mod:`~visualprm_ray.export.select`);
3. sort the selected rows by where their image sits and read each image straight from its input
   file (every row group about once), a path or URI fetched and embedded
   (:mod:`~visualprm_ray.export.formats`): images never go through the shuffle or the driver;
4. write Parquet files with the ``datasets`` features (:mod:`~visualprm_ray.export.sink`), then
   ``README.md`` (the dataset card), ``_export.json`` (counts by reason) and ``_SUCCESS``.

The driver handles listings and footers only: no row of the data passes through it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow as pa

from visualprm_ray.export.config import ExportConfig

EXPORT_RECORD = "_export.json"
CARD = "README.md"
# Uncompressed bytes of the light columns per shuffle partition (as the flat layout's regroup).
PARTITION_BYTES = 128 << 20
MAX_PARTITIONS = 4096
ROW_GROUP_BYTES = 64 << 20


class ExportError(RuntimeError):
    """Something the user can fix: a scores output that is not finished, a changed input, an
    output that already holds files. One line, exit status 2."""


def _read_json(uri: str, storage) -> dict[str, Any] | None:
    from visualprm_ray.storage import fsspec_filesystem, with_retries

    fs, path = fsspec_filesystem(uri, storage)
    try:
        return json.loads(with_retries(lambda: fs.cat_file(path), what=f"reading {uri}"))
    except FileNotFoundError:
        return None


def _exists(uri: str, storage) -> bool:
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(uri, storage)
    fs.invalidate_cache()
    return fs.exists(path)


def job_config(config: ExportConfig, manifest: dict[str, Any]):
    """The scoring job's resolved config, with the export's input, images root and storage."""
    from visualprm_ray.job.config import JobConfig

    data = dict(manifest["config"])
    data["storage"] = config.storage.model_dump(mode="json")
    if config.input.uri is not None:
        data["input"] = {**data["input"], "uri": config.input.uri}
    if config.input.images_root is not None:
        data["images"] = {**data["images"], "root": config.input.images_root}
    data["runtime"] = {**data["runtime"], "ray_address": config.runtime.ray_address}
    return JobConfig.from_dict(data)


def _check_output(config: ExportConfig, input_uri: str) -> None:
    from visualprm_ray.storage import fsspec_filesystem, redact, split_uri

    out = config.output.uri.rstrip("/")
    for other, what in ((config.scores.uri.rstrip("/"), "the scores"), (input_uri.rstrip("/"), "the input")):
        if out == other or out.startswith(other + "/"):
            raise ExportError(f"output {redact(out)} is in {what} ({redact(other)}); choose another --to")
    fs, path = fsspec_filesystem(out, config.storage)
    if fs.exists(path) and fs.ls(path):
        if config.output.mode == "error":
            raise ExportError(
                f"output {redact(out)} already holds files; choose another --to or --set output.mode=overwrite"
            )
        fs.rm(path, recursive=True)
    if split_uri(out)[0] == "file":
        fs.makedirs(path, exist_ok=True)


def run_export(config: ExportConfig, *, emit=print) -> dict[str, Any]:
    """Run the export to completion and return what ``_export.json`` records."""
    from visualprm_ray.job.driver import MANIFEST, SUCCESS, init_ray, input_fingerprint
    from visualprm_ray.job.inputs import plan_read
    from visualprm_ray.storage import list_files, redact

    started = time.time()
    scores = config.scores.uri.rstrip("/")
    manifest = _read_json(f"{scores}/{MANIFEST}", config.storage)
    if manifest is None:
        raise ExportError(
            f"{redact(scores)} holds no {MANIFEST}: not the output of a visualprm-ray score job"
        )
    if not config.scores.allow_incomplete and not _exists(f"{scores}/{SUCCESS}", config.storage):
        raise ExportError(
            f"{redact(scores)} has no {SUCCESS} (status {manifest.get('status')!r}): the run did not "
            "finish; pass --allow-incomplete to export what it holds"
        )
    job = job_config(config, manifest)
    listing = list_files(job.input.uri, config.storage, detail=True)
    if config.input.uri is None:
        recorded = manifest.get("input", {}).get("fingerprint")
        if recorded != input_fingerprint(listing):
            raise ExportError(
                f"the input {redact(job.input.uri)} changed since it was scored (its listing, sizes or "
                "versions differ from the scores' manifest); pass --input to join from it as it is now"
            )
    _check_output(config, job.input.uri)
    init_ray(job)
    plan = plan_read(job, listing)
    score_files, score_schema = _score_files(config, job, scores)
    threshold = config.export.threshold
    if threshold is None:
        threshold = job.scoring.threshold
    passthrough = _passthrough(job, score_schema)
    emit(
        f"[visualprm-ray] export {config.export.format}: {plan.num_rows} input row(s) in {len(plan.files)} "
        f"file(s), {sum(f.num_rows for f in score_files)} score row(s) in {len(score_files)} file(s) "
        f"-> {redact(config.output.uri)}"
    )
    ds, dataset_schema = build_export(config, job, plan, score_files, passthrough, threshold)
    sink = _sink(config, job, plan, dataset_schema)
    ds.write_datasink(sink)
    result = sink.result
    if result is None:  # pragma: no cover - Ray Data always calls on_write_complete on success
        raise RuntimeError("the export's write finished without its counts")
    record = _record(config, job, manifest, result, passthrough, threshold, started)
    if not record["rows"]:
        # datasets cannot load a split without rows: a dataset of none is refused, with its counts.
        _finish(config, record, success=False)
        skipped = ", ".join(f"{k} {v}" for k, v in record["groups_skipped"].items()) or "none"
        raise ExportError(
            f"no group of {record['groups']} qualified (skipped: {skipped}); nothing written but "
            f"{EXPORT_RECORD} and {CARD}; loosen --min-margin / --min-score"
        )
    _finish(config, record)
    emit(
        f"[visualprm-ray] exported {record['rows']} row(s) from {record['groups_exported']} of "
        f"{record['groups']} group(s) in {record['elapsed_s']:.1f}s"
        + (
            "; skipped: " + ", ".join(f"{k} {v}" for k, v in record["groups_skipped"].items())
            if record["groups_skipped"]
            else ""
        )
        + f" -> {redact(config.output.uri)}"
    )
    return record


def _score_files(config: ExportConfig, job, scores: str):
    from visualprm_ray.job.inputs import InputFile, keep_footer, read_footers
    from visualprm_ray.storage import list_files

    listing = list_files(scores, config.storage, recursive=False, detail=True)
    if not listing:
        raise ExportError(f"{scores} holds no Parquet files")
    footers = read_footers(listing, job)
    files = [
        InputFile.from_metadata(uri, m, size=size, footer=keep_footer(m))
        for (uri, size, _), (m, _) in zip(listing, footers, strict=True)
    ]
    return files, footers[0][1]


def _passthrough(job, score_schema: pa.Schema) -> list[pa.Field]:
    """The scores' passthrough columns the dataset keeps: not the question (it is the prompt) and
    not image bytes (they are ``images``)."""
    from visualprm_ray.job.inputs import _normal
    from visualprm_ray.schema import RESERVED

    out = []
    for f in score_schema:
        if f.name in RESERVED or f.name == job.input.question_column:
            continue
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            continue
        if f.name in ("images", "prompt", "chosen", "rejected", "completion", "completions", "labels"):
            continue  # the dataset's own columns win over a passthrough of the same name
        out.append(pa.field(f.name, _normal(f.type)))
    return out


def build_export(config: ExportConfig, job, plan, score_files, passthrough, threshold: float):
    """The lazy dataset of the export's rows (and reason rows), and the dataset's schema."""
    import ray

    from visualprm_ray.export import select
    from visualprm_ray.export.formats import dataset_schema
    from visualprm_ray.job import stages as col
    from visualprm_ray.job.stages.read import InputGroups, Rename

    inp = job.input
    image = inp.image_column if inp.image_column in plan.schema.names else None
    # What select needs from the input: ids, question, responses, steps, a flat input's index
    # column; never the image (it is read after the shuffle) nor the passthrough (the scores hold it).
    needed = {inp.id_column, inp.question_column, inp.responses_column, inp.response_column, inp.steps_column}
    if plan.candidate_index_column:
        needed.add(plan.candidate_index_column)
    light = pa.schema([f for f in plan.schema if f.name in needed])
    union = select.union_schema(passthrough)
    rows_per_block = max(1024, job.runtime.groups_per_batch * 16)
    inputs = ray.data.read_datasource(
        InputGroups(
            plan.files,
            config.storage,
            schema=light,
            rows_per_block=rows_per_block,
            derive_ids=not plan.has_id,
            row_positions=True,
        )
    )
    inputs = inputs.map_batches(
        Rename(job, _light_plan(plan, light)), batch_format="pyarrow", zero_copy_batch=True
    )
    inputs = inputs.map_batches(
        select.input_rows, batch_format="pyarrow", fn_kwargs={"layout": plan.layout, "schema": union}
    )
    score_schema = pa.schema(
        [pa.field("id", pa.string())]
        + [pa.field(n, t) for n, t in select.SCORE_COLUMNS.items()]
        + list(passthrough)
    )
    scores = ray.data.read_datasource(
        InputGroups(score_files, config.storage, schema=score_schema, rows_per_block=rows_per_block)
    )
    scores = scores.map_batches(select.score_rows, batch_format="pyarrow", fn_kwargs={"schema": union})
    selection = select.Selection(
        format=config.export.format,
        layout=plan.layout,
        min_margin=config.export.min_margin,
        min_score=config.export.min_score,
        threshold=threshold,
        max_steps=job.scoring.max_steps,
        passthrough=tuple(f.name for f in passthrough),
    )
    selected = select.selected_schema(selection, passthrough)
    partitions = config.runtime.num_partitions or _partitions(plan, score_files, image)
    ds = (
        inputs.union(scores)
        .groupby(col.ID, num_partitions=partitions)
        .map_groups(
            select.select_table,
            batch_format="pyarrow",
            fn_kwargs={"selection": selection, "schema": selected},
        )
    )
    ds = ds.map_batches(_contiguous, batch_format="pyarrow", batch_size=None)
    ds = ds.sort([col.IMAGE_FILE, col.IMAGE_ROW])
    schema = dataset_schema(config.export.format, passthrough)
    finish = Finish(
        ray.put(plan.files),
        config.storage,
        column=image,
        image_type=plan.schema.field(image).type if image else None,
        images_root=job.images.root,
        fmt=config.export.format,
        schema=_with_bookkeeping(schema),
    )
    return ds.map_batches(finish, batch_format="pyarrow"), schema


def _light_plan(plan, light: pa.Schema):
    """The plan as :class:`~visualprm_ray.job.stages.read.Rename` sees the light read: without
    the passthrough columns, which the export takes from the scores."""
    from dataclasses import replace

    return replace(plan, passthrough=[], schema=light)


def _contiguous(table: pa.Table) -> pa.Table:
    return table.combine_chunks()


def _with_bookkeeping(schema: pa.Schema) -> pa.Schema:
    from visualprm_ray.export.select import FIRST, REASON

    return schema.append(pa.field(REASON, pa.string())).append(pa.field(FIRST, pa.bool_()))


def _partitions(plan, score_files, image: str | None) -> int:
    import ray

    light = sum(size for f in plan.files for name, size in f.column_bytes if name != image)
    light += sum(sum(f.row_group_bytes) for f in score_files)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(MAX_PARTITIONS, max(math.ceil(light / PARTITION_BYTES), cpus)))


class Finish:
    """``map_batches`` callable: selected rows (sorted by image place) -> the dataset's rows.

    The image cells are read from the input files as the flat layout's regroup reads them
    (:class:`~visualprm_ray.job.stages.regroup.JoinImages`); paths and URIs among them are fetched
    together, one request each, relative ones under the job's ``images.root``.
    """

    def __init__(self, files, storage, *, column, image_type, images_root, fmt, schema) -> None:
        self.files = files
        self.storage = storage
        self.column = column
        self.image_type = image_type
        self.images_root = images_root
        self.fmt = fmt
        self.schema = schema

    def __call__(self, table: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        from visualprm_ray.export.formats import finish_rows
        from visualprm_ray.export.select import REASON
        from visualprm_ray.job import stages as col
        from visualprm_ray.job.stages.regroup import JoinImages
        from visualprm_ray.model.images import fetch_uris, image_uris

        keep = pc.is_null(table[REASON])
        data, other = table.filter(keep), table.filter(pc.invert(keep))
        cells: list[Any] = [None] * len(data)
        if self.column is not None and len(data):
            joined = JoinImages(self.files, self.storage, column=self.column, image_type=self.image_type)(
                data
            )
            cells = joined[col.IMAGE].to_pylist()
        uris = [u for c in cells for u in image_uris(c)]
        fetched = fetch_uris(uris, root=self.images_root, options=self.storage) if uris else {}
        rows = finish_rows(data.to_pylist(), cells, self.fmt, fetched)
        rows += finish_rows(other.to_pylist(), [None] * len(other), self.fmt, fetched)
        return pa.Table.from_pylist(rows, schema=self.schema)


def _sink(config: ExportConfig, job, plan, schema: pa.Schema):
    """The writer, its files sized to ``output.target_file_bytes`` from the input's column sizes."""
    from visualprm_ray.export.sink import DatasetSink

    per_row = _row_bytes(config, job, plan)
    rows_per_file = config.output.rows_per_file or int(
        min(1_000_000, max(1, config.output.target_file_bytes // per_row))
    )
    rows_per_group = max(1, min(rows_per_file, ROW_GROUP_BYTES // per_row))
    return DatasetSink(
        config.output.uri, config.storage, schema, rows_per_file=rows_per_file, rows_per_group=rows_per_group
    )


def _row_bytes(config: ExportConfig, job, plan) -> int:
    """Bytes of one exported row, estimated from the input's footers (uncompressed)."""
    sizes = plan.column_sizes()
    rows = max(1, plan.num_rows)
    inp = job.input
    image = sizes.get(inp.image_column, 0) / rows
    if inp.image_column in plan.schema.names:
        t = plan.schema.field(inp.image_column).type
        if pa.types.is_string(t) or (pa.types.is_list(t) and pa.types.is_string(t.value_type)):
            image = config.output.image_bytes_estimate  # a path: the image itself is fetched
    text = (sizes.get(inp.responses_column, 0) + sizes.get(inp.response_column, 0)) / rows
    if plan.layout == "grouped":
        candidates = max(1, sum(c or 0 for f in plan.files for c in f.candidates) or rows)
        text = text * rows / candidates  # one response's bytes
    per_response = 2 if config.export.format == "dpo" else 1
    question = sizes.get(inp.question_column, 0) / rows
    return max(1, int(image + question + per_response * text + 200))


def _record(config, job, manifest, result, passthrough, threshold, started) -> dict[str, Any]:
    from visualprm_ray import __version__
    from visualprm_ray.storage import redact

    finished = time.time()
    filters = {
        "dpo": {"min_margin": config.export.min_margin},
        "sft": {"min_score": config.export.min_score},
        "prm": {"threshold": threshold},
    }[config.export.format]
    return {
        "format": config.export.format,
        "version": __version__,
        "scores": redact(config.scores.uri),
        "scores_status": manifest.get("status"),
        "input": redact(job.input.uri),
        "model": manifest.get("model", {}),
        "filters": filters,
        "groups": result["groups"],
        "groups_exported": result["groups_exported"],
        "groups_skipped": result["skipped"],
        "rows": result["rows"],
        "files": result["files"],
        "passthrough": [f.name for f in passthrough],
        "elapsed_s": finished - started,
    }


def _finish(config: ExportConfig, record: dict[str, Any], *, success: bool = True) -> None:
    """Leftovers of an earlier failed attempt removed, then the card, the record and ``_SUCCESS``
    (written last: a reader waits for it)."""
    from visualprm_ray.export.card import render_card, render_record
    from visualprm_ray.export.sink import FILE_PREFIX
    from visualprm_ray.job.driver import SUCCESS
    from visualprm_ray.storage import fsspec_filesystem, list_files

    out = config.output.uri.rstrip("/")
    fs, path = fsspec_filesystem(out, config.storage)
    kept = set(record["files"])
    for uri in list_files(out, config.storage, recursive=False):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith(FILE_PREFIX) and name not in kept:
            fs.rm(f"{path}/{name}")
    fs.pipe_file(f"{path}/{CARD}", render_card(record).encode())
    fs.pipe_file(f"{path}/{EXPORT_RECORD}", render_record(record).encode())
    if success:
        fs.pipe_file(f"{path}/{SUCCESS}", b"")
