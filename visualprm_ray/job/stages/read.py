"""Read: Parquet shards -> one row per group, with the job's internal column names.

The driver has already opened every input file once (to count candidates and check ids), so it
knows each file's row groups (:class:`~visualprm_ray.job.inputs.InputFile`); :class:`InputGroups`
cuts read tasks from those row groups and each task yields blocks of a fixed number of rows. That
gives blocks small enough for every preparer to get work even on a tiny input, and never larger
than a few batches on a huge one, without Ray Data's footer-reading actors or a repartition step (on
a small machine those cost more start-up than the read itself). Only the columns the job needs are
read (the configured ones plus passthrough), over a pyarrow filesystem for any protocol. The flat
layout (one row per candidate) is grouped by id with a shuffle so that ranks always see the
whole group.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from visualprm_ray.job import stages as col
from visualprm_ray.job.inputs import InputFile, ReadPlan

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data

    from visualprm_ray.job.config import JobConfig


def read_groups(
    config: JobConfig,
    plan: ReadPlan,
    files: Sequence[InputFile],
    *,
    rows_per_block: int,
    skip_ids: ray.ObjectRef | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of group rows: internal columns plus passthrough columns.

    ``files`` are the input files with their row groups (:func:`visualprm_ray.job.counts.count_input`
    reads them); ``skip_ids`` (a string array in the object store) holds the ids of groups an
    earlier attempt already committed (:mod:`visualprm_ray.job.resume`); their rows are dropped right
    after the ids are known, before any work is spent on them.
    """
    import ray.data

    from visualprm_ray.storage import pyarrow_filesystem

    inp = config.input
    fs, _ = pyarrow_filesystem(plan.files[0], config.storage)
    wanted = [inp.question_column, inp.image_column]
    wanted += [inp.responses_column] if plan.layout == "grouped" else [inp.response_column]
    wanted += [inp.id_column] if plan.has_id else []
    wanted += [inp.steps_column] if plan.has_steps else []
    wanted += ["candidate_index"] if plan.has_candidate_index else []
    wanted += [f.name for f in plan.passthrough]
    columns = [c for c in dict.fromkeys(wanted) if c in plan.schema.names]  # the image is optional
    source = InputGroups(
        files,
        fs,
        columns=columns,
        schema=pa.schema([plan.schema.field(c) for c in columns]),
        rows_per_block=rows_per_block,
        include_paths=not plan.has_id,
        retries=config.storage.retries,
    )
    ds = ray.data.read_datasource(source)
    rename = _Rename(config, plan, skip_ids)
    ds = ds.map_batches(rename, batch_format="pyarrow", zero_copy_batch=True)
    if plan.layout == "flat":
        ds = ds.groupby(col.ID).map_groups(
            flat_to_group,
            batch_format="pyarrow",
            fn_kwargs={"passthrough": [f.name for f in plan.passthrough]},
        )
    return ds


class _Rename:
    """Configured column names -> internal names; derives ids where the input has none."""

    def __init__(self, config: JobConfig, plan: ReadPlan, skip_ids: ray.ObjectRef | None = None) -> None:
        inp = config.input
        self.skip_ids = skip_ids
        self.mapping = {inp.question_column: col.QUESTION, inp.image_column: col.IMAGE}
        if plan.layout == "grouped":
            self.mapping[inp.responses_column] = col.RESPONSES
        else:
            self.mapping[inp.response_column] = col.RESPONSES
        if plan.has_id:
            self.mapping[inp.id_column] = col.ID
        if plan.has_steps:
            self.mapping[inp.steps_column] = col.STEPS
        if plan.has_candidate_index:
            self.mapping["candidate_index"] = col.CANDIDATE_INDEX
        self.keep_image = inp.keep_image_bytes
        self.image_column = inp.image_column
        self.has_id = plan.has_id

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.keep_image and self.image_column in table.column_names:
            # The image is both an input (under the internal name) and a passthrough column.
            table = table.append_column(col.IMAGE, table[self.image_column])
            mapping = {k: v for k, v in self.mapping.items() if k != self.image_column}
        else:
            mapping = self.mapping
        table = table.rename_columns([mapping.get(n, n) for n in table.column_names])
        if col.IMAGE not in table.column_names:
            table = table.append_column(col.IMAGE, pa.nulls(len(table), pa.binary()))
        if not self.has_id:
            table = table.append_column(col.ID, pa.array(_derived_ids(table), pa.string()))
            table = table.drop_columns(["path"])
        else:
            table = table.set_column(
                table.column_names.index(col.ID), col.ID, table[col.ID].cast(pa.string())
            )
        if self.skip_ids is not None:
            import pyarrow.compute as pc

            done = pc.is_in(table[col.ID], value_set=_object(self.skip_ids))
            table = table.filter(pc.invert(pc.fill_null(done, False)))
        return table


_OBJECTS: dict[str, pa.Array] = {}


def _object(ref: ray.ObjectRef) -> pa.Array:
    """An object-store value, fetched once per worker process (the id set can be large)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        _OBJECTS.clear()  # one job's set at a time
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


def _derived_ids(table: pa.Table) -> list[str]:
    """``<file name>:<content hash>``: stable across re-sharding and reruns, unlike a row number."""
    seen: dict[str, int] = {}
    ids = []
    questions = table[col.QUESTION].to_pylist()
    responses = table[col.RESPONSES].to_pylist()
    for path, q, r in zip(table["path"].to_pylist(), questions, responses, strict=True):
        digest = hashlib.sha1(repr((q, r)).encode()).hexdigest()[:16]
        key = f"{posixpath.basename(path)}:{digest}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        # Identical rows of a file meeting in one batch still get distinct ids.
        ids.append(key if n == 0 else f"{key}-{n}")
    return ids


def flat_to_group(table: pa.Table, passthrough: list[str]) -> pa.Table:
    """One group row from the flat rows sharing an id.

    Candidates are ordered by an input ``candidate_index`` column when there is one, else by
    response text: the shuffle does not keep input order, and a deterministic order keeps
    ``candidate_index`` stable across reruns. Passthrough values stay per candidate (as lists).
    """
    rows = table.to_pylist()
    if col.CANDIDATE_INDEX in table.column_names:
        rows.sort(key=lambda r: (r[col.CANDIDATE_INDEX] is None, r[col.CANDIDATE_INDEX]))
        indices = [r[col.CANDIDATE_INDEX] for r in rows]
    else:
        rows.sort(key=lambda r: (r[col.RESPONSES] is None, r[col.RESPONSES] or ""))
        indices = list(range(len(rows)))
    first = rows[0]
    out = {
        col.ID: pa.array([first[col.ID]], pa.string()),
        col.QUESTION: pa.array([first[col.QUESTION]], table.schema.field(col.QUESTION).type),
        col.IMAGE: pa.array([first[col.IMAGE]], table.schema.field(col.IMAGE).type),
        col.RESPONSES: pa.array(
            [[r[col.RESPONSES] for r in rows]], pa.list_(table.schema.field(col.RESPONSES).type)
        ),
        col.CANDIDATE_INDEX: pa.array([indices], pa.list_(pa.int32())),
    }
    if col.STEPS in table.column_names:
        out[col.STEPS] = pa.array(
            [[r[col.STEPS] for r in rows]], pa.list_(table.schema.field(col.STEPS).type)
        )
    for name in passthrough:
        out[name] = pa.array([[r[name] for r in rows]], pa.list_(table.schema.field(name).type))
    return pa.table(out)


class InputGroups(Datasource):
    """The input files' rows, in blocks of ``rows_per_block`` rows.

    A read task covers consecutive row groups of one file, at least ``rows_per_block`` rows
    unless the file ends first: a big row group is read once and handed on in pieces, small ones
    are read together. Ray Data's ``parallelism`` hint is ignored; the row groups decide.
    """

    def __init__(
        self,
        files: Sequence[InputFile],
        filesystem: pyarrow.fs.FileSystem,
        *,
        columns: list[str],
        schema: pa.Schema,
        rows_per_block: int,
        include_paths: bool,
        retries: int = 5,
    ) -> None:
        super().__init__()
        self.files = list(files)
        self.filesystem = filesystem
        self.columns = columns
        self.schema = schema  # of ``columns``; for the empty input's one block
        self.rows_per_block = rows_per_block
        self.include_paths = include_paths
        self.retries = retries

    def get_name(self) -> str:
        return "ReadInput"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(sum(f.row_group_bytes) for f in self.files)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **_: Any
    ) -> list[ReadTask]:
        tasks = []
        for file in self.files:
            for span in row_group_spans(file.row_group_rows, self.rows_per_block):
                read = partial(
                    read_span,
                    self.filesystem,
                    file.path,
                    span,
                    columns=self.columns,
                    rows_per_block=self.rows_per_block,
                    include_paths=self.include_paths,
                    retries=self.retries,
                )
                meta = BlockMetadata(
                    num_rows=sum(file.row_group_rows[i] for i in span),
                    size_bytes=sum(file.row_group_bytes[i] for i in span),
                    input_files=[file.path],
                    exec_stats=None,
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        if not tasks:  # every file is empty: one empty block carries the schema on
            empty = self.schema.empty_table()
            if self.include_paths:
                empty = empty.append_column("path", pa.array([], pa.string()))
            meta = BlockMetadata(num_rows=0, size_bytes=0, input_files=None, exec_stats=None)
            tasks.append(ReadTask(partial(_one, empty), meta))
        return tasks


def row_group_spans(rows: Sequence[int], rows_per_block: int) -> list[range]:
    """Consecutive row groups, each span closed once it holds ``rows_per_block`` rows."""
    spans, start, held = [], 0, 0
    for i, n in enumerate(rows):
        held += n
        if held >= rows_per_block:
            spans.append(range(start, i + 1))
            start, held = i + 1, 0
    if held:
        spans.append(range(start, len(rows)))
    return spans


def read_span(
    filesystem: pyarrow.fs.FileSystem,
    path: str,
    span: range,
    *,
    columns: list[str],
    rows_per_block: int,
    include_paths: bool,
    retries: int = 5,
) -> Iterator[pa.Table]:
    """One read task: the span's row groups, handed on in blocks of ``rows_per_block`` rows.

    The span is read whole, under :func:`~visualprm_ray.storage.with_retries`, before the first
    block is yielded: a retry never repeats rows already handed on.
    """
    import pyarrow.parquet as pq

    from visualprm_ray.storage import with_retries

    def read() -> pa.Table:
        with pq.ParquetFile(path, filesystem=filesystem) as parquet:
            return parquet.read_row_groups(list(span), columns=columns)

    table = with_retries(read, what=f"reading input {path}", retries=retries)
    if include_paths:  # derived ids are keyed on the file name
        table = table.append_column("path", pa.array([path] * len(table), pa.string()))
    for start in range(0, len(table), rows_per_block):
        yield table.slice(start, rows_per_block)


def _one(table: pa.Table) -> list[pa.Table]:
    return [table]
