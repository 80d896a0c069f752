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
from visualprm_ray.job.inputs import FileSkip, InputFile, ReadPlan

if TYPE_CHECKING:
    import ray.data

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.storage import StorageOptions


def read_groups(
    config: JobConfig,
    plan: ReadPlan,
    *,
    rows_per_block: int,
    skip: dict[int, FileSkip] | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of group rows: internal columns plus passthrough columns.

    ``skip`` says what an earlier attempt already committed (:func:`visualprm_ray.job.resume.plan_skips`):
    those row groups are never read and those rows are dropped as they are read, before any work is
    spent on them. Blocks hold about ``rows_per_block`` rows: Ray Data merges what a read task
    yields into one block, so the read asks it to split each task's block that many ways.
    """
    import ray.data

    source = InputGroups(
        plan.files,
        config.storage,
        schema=plan.schema,
        rows_per_block=rows_per_block,
        derive_ids=not plan.internal and not plan.has_id,
        skip=skip,
    )
    rows = sum(m.num_rows for m in source._spans_metadata())
    blocks = max(1, -(-rows // rows_per_block))
    ds = ray.data.read_datasource(source, override_num_blocks=blocks)
    return ds.map_batches(Rename(config, plan), batch_format="pyarrow", zero_copy_batch=True)


class Rename:
    """Configured column names -> internal names."""

    def __init__(self, config: JobConfig, plan: ReadPlan) -> None:
        inp = config.input
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
        # Columns that are both an input of the job (under an internal name) and passed through
        # under their own: the image with input.keep_image_bytes, the user's id and question.
        passthrough = {f.name for f in plan.passthrough}
        self.copies = [] if plan.internal else [c for c in self.mapping if c in passthrough]

    def __call__(self, table: pa.Table) -> pa.Table:
        mapping = self.mapping
        for name in self.copies:
            if name in table.column_names:
                table = table.append_column(mapping[name], table[name])
        if self.copies:
            mapping = {k: v for k, v in mapping.items() if k not in self.copies}
        table = table.rename_columns([mapping.get(n, n) for n in table.column_names])
        if col.IMAGE not in table.column_names:
            table = table.append_column(col.IMAGE, pa.nulls(len(table), pa.binary()))
        if table.schema.field(col.ID).type != pa.string():
            table = table.set_column(
                table.column_names.index(col.ID), col.ID, table[col.ID].cast(pa.string())
            )
        return table


_OBJECTS: dict[str, Any] = {}
_KEEP_OBJECTS = 256


def _object(ref: ray.ObjectRef) -> Any:
    """An object-store value, fetched once per worker process (footers, the regroup's file list)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        if len(_OBJECTS) >= _KEEP_OBJECTS:
            _OBJECTS.pop(next(iter(_OBJECTS)))  # the oldest: a worker moves from file to file
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


class InputGroups(Datasource):
    """The input files' rows, cut into read tasks of whole row groups.

    A read task covers row groups of one file, at least ``rows_per_block`` rows unless the file
    ends first: a big row group is read once, small ones are read together. Ray Data's
    ``parallelism`` hint is ignored; the row groups decide. Row groups an earlier attempt
    committed whole (``skip``) are not read at all, and files committed whole cost no task.
    """

    def __init__(
        self,
        files: Sequence[InputFile],
        storage: StorageOptions,
        *,
        schema: pa.Schema,
        rows_per_block: int,
        derive_ids: bool = False,
        row_positions: bool = False,
        skip: dict[int, FileSkip] | None = None,
    ) -> None:
        super().__init__()
        self.files = list(files)
        self.storage = storage
        self.schema = schema  # the columns read, in the types every block is cast to
        self.rows_per_block = rows_per_block
        self.derive_ids = derive_ids  # add ``_vp_id`` = "<relative path>#<row>"
        self.row_positions = row_positions  # add ``_vp_file`` (index into ``files``) and ``_vp_row``
        self.skip = skip or {}

    def get_name(self) -> str:
        return "ReadInput"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(m.size_bytes for m in self._spans_metadata())

    def _spans(self) -> Iterator[tuple[int, InputFile, list[int], list[int]]]:
        """``(file index, file, row groups, their first rows in the file)`` of every read task."""
        for index, file in enumerate(self.files):
            skip = self.skip.get(index, FileSkip())
            starts = np.concatenate([[0], np.cumsum(file.row_group_rows, dtype=np.int64)])
            wanted = [g for g in range(len(file.row_group_rows)) if g not in skip.row_groups]
            for span in row_group_spans([file.row_group_rows[g] for g in wanted], self.rows_per_block):
                groups = [wanted[k] for k in span]
                yield index, file, groups, [int(starts[g]) for g in groups]

    def _spans_metadata(self) -> Iterator[BlockMetadata]:
        for _, file, groups, _ in self._spans():
            yield BlockMetadata(
                num_rows=sum(file.row_group_rows[g] for g in groups),
                size_bytes=sum(file.row_group_bytes[g] for g in groups),
                input_files=[file.uri],
                exec_stats=None,
            )

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **_: Any
    ) -> list[ReadTask]:
        tasks = []
        for (index, file, groups, first_rows), meta in zip(
            self._spans(), self._spans_metadata(), strict=True
        ):
            drops = self.skip.get(index, FileSkip()).rows
            read = partial(
                read_span,
                file,
                groups,
                first_rows,
                schema=self.schema,
                storage=self.storage,
                drop={g: drops[g] for g in groups if g in drops},
                id_prefix=file.relpath if self.derive_ids else None,
                file_index=index if self.row_positions else None,
            )
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        if not tasks:  # every file is empty (or committed): one empty block carries the schema on
            empty = _with_positions(
                self.schema.empty_table(),
                np.zeros(0, np.int64),
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
    file: InputFile,
    row_groups: list[int],
    first_rows: list[int],
    *,
    schema: pa.Schema,
    storage: StorageOptions,
    drop: dict[int, bytes] | None = None,
    id_prefix: str | None = None,
    file_index: int | None = None,
) -> Iterator[pa.Table]:
    """One read task: the row groups' columns of ``schema``, cast to it, as one block.

    Only the column chunks are fetched: the footer comes from the driver (through Ray's object
    store) and the file's size from the listing, so there is no footer read and no HEAD request.
    The rows are read whole, under :func:`~visualprm_ray.storage.with_retries`, before anything is
    yielded: a retry never repeats rows already handed on. ``first_rows`` are the file's row index
    of each row group's first row, for derived ids (``id_prefix``) and row positions
    (``file_index``); ``drop`` the rows an earlier attempt committed (bitmaps per row group).
    """
    from visualprm_ray.storage import read_parquet

    metadata = _object(file.footer) if file.footer is not None else None
    parts = []
    for group, first in zip(row_groups, first_rows, strict=True):
        parts.append(np.arange(first, first + file.row_group_rows[group], dtype=np.int64))
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    table = read_parquet(
        file.uri, schema.names, storage, size=file.size, metadata=metadata, row_groups=row_groups
    )
    # The driver checked every file's types against the plan; this only unifies their variants
    # (large_string, an all-null column) so that blocks of different files concatenate.
    table = table.select(schema.names).cast(schema)
    table = _with_positions(table, rows, id_prefix, file_index)
    if drop:
        keep = np.concatenate(
            [
                ~np.unpackbits(np.frombuffer(drop[g], np.uint8), count=file.row_group_rows[g]).astype(bool)
                if g in drop
                else np.ones(file.row_group_rows[g], bool)
                for g in row_groups
            ]
        )
        table = table.filter(pa.array(keep))
    yield table


def _with_positions(
    table: pa.Table, rows: np.ndarray, id_prefix: str | None, file_index: int | None
) -> pa.Table:
    if id_prefix is not None:
        table = table.append_column(col.ID, derived_ids(id_prefix, rows))
    if file_index is not None:
        table = table.append_column(col.FILE, pa.array(np.full(len(table), file_index, np.int32)))
        table = table.append_column(col.ROW, pa.array(rows))
    return table


def derived_ids(relpath: str, rows: np.ndarray) -> pa.Array:
    """The ids of an input without an id column: ``<path relative to the input root>#<row>``."""
    ids = np.char.add(f"{relpath}#", rows.astype(str)) if len(rows) else np.array([], dtype=str)
    return pa.array(ids, pa.string())


def _one(table: pa.Table) -> list[pa.Table]:
    return [table]
