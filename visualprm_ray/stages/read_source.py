"""The read stage's Ray Data datasource: read tasks cut from the input files' row groups.

Separate from :mod:`visualprm_ray.stages.read` because it subclasses a Ray Data class, and the
rest of the read stage (planning, renaming) is imported where Ray is not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

if TYPE_CHECKING:
    import pyarrow.fs

    from visualprm_ray.stages.read import InputFile


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
