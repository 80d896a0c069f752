"""Read: Parquet shards -> one row per group, with the job's internal column names.

The driver has already read every input file's footer (:mod:`visualprm_ray.job.inputs`), so it
knows each file's row groups; :class:`InputGroups` cuts read tasks from those row groups and each
task yields blocks of a fixed number of rows, cast to the plan's schema. That gives blocks small
enough for every preparer to get work even on a tiny input, and never larger than a few batches on
a huge one, without Ray Data's footer-reading actors or a repartition step (on a small machine
those cost more start-up than the read itself). Only the columns the job needs are read (the
configured ones plus passthrough), over a pyarrow filesystem for any protocol.

An input without an id column gets ids derived from the file's path (relative to the input root)
and the row's position in it: unique by construction, whatever the rows hold, and the same on
every rerun of the same files. The flat layout (one row per candidate) is regrouped into group rows
by a pass of its own before scoring (:mod:`visualprm_ray.job.flat`); its group rows are read here
like any other, already under the internal names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
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
    *,
    rows_per_block: int,
    skip_ids: ray.ObjectRef | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of group rows: internal columns plus passthrough columns.

    ``skip_ids`` (a string array in the object store) holds the ids of groups an earlier attempt
    already committed (:mod:`visualprm_ray.job.resume`); their rows are dropped right after the ids
    are known, before any work is spent on them.
    """
    import ray.data

    from visualprm_ray.storage import pyarrow_filesystem

    fs, _ = pyarrow_filesystem(plan.uris[0], config.storage)
    derive = not plan.internal and not plan.has_id
    source = InputGroups(
        plan.files,
        fs,
        schema=plan.schema,
        rows_per_block=rows_per_block,
        derive_ids=derive,
        retries=config.storage.retries,
    )
    ds = ray.data.read_datasource(source)
    return ds.map_batches(Rename(config, plan, skip_ids), batch_format="pyarrow", zero_copy_batch=True)


class Rename:
    """Configured column names -> internal names, and the resume filter."""

    def __init__(self, config: JobConfig, plan: ReadPlan, skip_ids: ray.ObjectRef | None = None) -> None:
        inp = config.input
        self.skip_ids = skip_ids
        self.mapping: dict[str, str] = {}
        if not plan.internal:  # a regrouped flat input already holds the internal names
            self.mapping = {inp.question_column: col.QUESTION, inp.image_column: col.IMAGE}
            if plan.layout == "grouped":
                self.mapping[inp.responses_column] = col.RESPONSES
            else:
                self.mapping[inp.response_column] = col.RESPONSES
            if plan.has_id:
                self.mapping[inp.id_column] = col.ID
            if plan.has_steps:
                self.mapping[inp.steps_column] = col.STEPS
            if plan.candidate_index_column:
                self.mapping[plan.candidate_index_column] = col.CANDIDATE_INDEX
        self.keep_image = inp.keep_image_bytes and not plan.internal
        self.image_column = inp.image_column

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
        if table.schema.field(col.ID).type != pa.string():
            table = table.set_column(
                table.column_names.index(col.ID), col.ID, table[col.ID].cast(pa.string())
            )
        if self.skip_ids is not None:
            import pyarrow.compute as pc

            done = pc.is_in(table[col.ID], value_set=_object(self.skip_ids))
            table = table.filter(pc.invert(pc.fill_null(done, False)))
        return table


_OBJECTS: dict[str, Any] = {}


def _object(ref: ray.ObjectRef) -> Any:
    """An object-store value, fetched once per worker process (the id set can be large)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        _OBJECTS.clear()  # one job's set at a time
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


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
        schema: pa.Schema,
        rows_per_block: int,
        derive_ids: bool = False,
        row_positions: bool = False,
        retries: int = 5,
    ) -> None:
        super().__init__()
        self.files = list(files)
        self.filesystem = filesystem
        self.schema = schema  # the columns read, in the types every block is cast to
        self.rows_per_block = rows_per_block
        self.derive_ids = derive_ids  # add ``_vp_id`` = "<relative path>#<row>"
        self.row_positions = row_positions  # add ``_vp_file`` (index into ``files``) and ``_vp_row``
        self.retries = retries

    def get_name(self) -> str:
        return "ReadInput"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(sum(f.row_group_bytes) for f in self.files)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **_: Any
    ) -> list[ReadTask]:
        tasks = []
        for index, file in enumerate(self.files):
            starts = np.concatenate([[0], np.cumsum(file.row_group_rows, dtype=np.int64)])
            for span in row_group_spans(file.row_group_rows, self.rows_per_block):
                read = partial(
                    read_span,
                    self.filesystem,
                    file.path,
                    span,
                    schema=self.schema,
                    rows_per_block=self.rows_per_block,
                    first_row=int(starts[span.start]),
                    id_prefix=file.relpath if self.derive_ids else None,
                    file_index=index if self.row_positions else None,
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
            empty = _with_positions(
                self.schema.empty_table(),
                0,
                None if not self.derive_ids else "",
                0 if self.row_positions else None,
            )
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
    schema: pa.Schema,
    rows_per_block: int,
    first_row: int = 0,
    id_prefix: str | None = None,
    file_index: int | None = None,
    retries: int = 5,
) -> Iterator[pa.Table]:
    """One read task: the span's row groups, cast to ``schema``, handed on in blocks of
    ``rows_per_block`` rows.

    The span is read whole, under :func:`~visualprm_ray.storage.with_retries`, before the first
    block is yielded: a retry never repeats rows already handed on. ``first_row`` is the file's row
    index of the span's first row, for derived ids (``id_prefix``) and row positions (``file_index``).
    """
    import pyarrow.parquet as pq

    from visualprm_ray.storage import with_retries

    def read() -> pa.Table:
        with pq.ParquetFile(path, filesystem=filesystem) as parquet:
            return parquet.read_row_groups(list(span), columns=schema.names)

    table = with_retries(read, what=f"reading input {path}", retries=retries)
    # The driver checked every file's types against the plan; this only unifies their variants
    # (large_string, an all-null column) so that blocks of different files concatenate.
    table = table.select(schema.names).cast(schema)
    table = _with_positions(table, first_row, id_prefix, file_index)
    for start in range(0, len(table), rows_per_block):
        yield table.slice(start, rows_per_block)


def _with_positions(
    table: pa.Table, first_row: int, id_prefix: str | None, file_index: int | None
) -> pa.Table:
    rows = np.arange(first_row, first_row + len(table), dtype=np.int64)
    if id_prefix is not None:
        ids = np.char.add(f"{id_prefix}#", rows.astype(str)) if len(rows) else np.array([], dtype=str)
        table = table.append_column(col.ID, pa.array(ids, pa.string()))
    if file_index is not None:
        table = table.append_column(col.FILE, pa.array(np.full(len(table), file_index, np.int32)))
        table = table.append_column(col.ROW, pa.array(rows))
    return table


def _one(table: pa.Table) -> list[pa.Table]:
    return [table]
