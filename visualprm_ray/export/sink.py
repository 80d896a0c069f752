"""Write: the dataset's rows -> Parquet files ``train-NNNNN.parquet``, counting what was left out.

A Ray Data datasink, so that every write task's counts come back to the driver exactly once
(Ray Data hands :meth:`DatasetSink.on_write_complete` the return of each task's successful
attempt): the rows a group gave, and for a group that gave none its reason, for ``_export.json``.
A task writes one file, named by its task index: a retried task rewrites the same name, and a
file appears whole (a local file is renamed into place; an object store shows an upload only
once it is complete).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from visualprm_ray.export.select import FIRST, REASON
from visualprm_ray.storage import StorageOptions

FILE_PREFIX = "train-"


class DatasetSink(Datasink):
    def __init__(
        self,
        uri: str,
        storage: StorageOptions,
        schema: pa.Schema,
        *,
        rows_per_file: int,
        rows_per_group: int,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.result: dict[str, Any] | None = None

    def get_name(self) -> str:
        return "WriteDataset"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if len(t)]
        if not tables:
            return {"files": [], "rows": 0, "groups": 0, "groups_exported": 0, "skipped": {}}
        table = pa.concat_tables(tables)
        first = table[FIRST].fill_null(False).to_numpy(zero_copy_only=False)
        reasons = table[REASON].to_pylist()
        data = pc.is_null(table[REASON])
        skipped = Counter(r for r, f in zip(reasons, first, strict=True) if f and r is not None)
        exported = int(sum(1 for r, f in zip(reasons, first, strict=True) if f and r is None))
        rows = table.filter(data).select(self.schema.names).cast(self.schema)
        files = []
        if len(rows):
            name = f"{FILE_PREFIX}{ctx.task_idx:05d}.parquet"
            write_file(f"{self.uri}/{name}", rows, self.storage, rows_per_group=self.rows_per_group)
            files.append(name)
        return {
            "files": files,
            "rows": len(rows),
            "groups": int(first.sum()),
            "groups_exported": exported,
            "skipped": dict(skipped),
        }

    def on_write_complete(self, write_result: Any) -> None:
        total: dict[str, Any] = {
            "files": [],
            "rows": 0,
            "groups": 0,
            "groups_exported": 0,
            "skipped": Counter(),
        }
        for part in write_result.write_returns:
            total["files"] += part["files"]
            total["skipped"].update(part["skipped"])
            for key in ("rows", "groups", "groups_exported"):
                total[key] += part[key]
        total["skipped"] = dict(sorted(total["skipped"].items()))
        total["files"] = sorted(total["files"])
        self.result = total


def write_file(uri: str, table: pa.Table, storage: StorageOptions, *, rows_per_group: int) -> None:
    """One Parquet file, whole or not at all."""
    import pyarrow.parquet as pq

    from visualprm_ray.storage import pyarrow_filesystem, redact, split_uri, with_retries

    fs, path = pyarrow_filesystem(uri, storage)
    local = split_uri(uri)[0] == "file"
    target = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp" if local else path

    def once() -> None:
        with fs.open_output_stream(target) as out, pq.ParquetWriter(out, table.schema) as writer:
            writer.write_table(table, row_group_size=rows_per_group)
        if local:
            fs.move(target, path)

    with_retries(once, what=f"writing {redact(uri)}", retries=storage.retries)
