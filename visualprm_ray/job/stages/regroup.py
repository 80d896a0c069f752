"""Regroup (flat layout only): one row per candidate -> one row per group, images joined back after.

The flat rows are shuffled by id **without their images**: each carries where it sits in the input
(file, row) instead, so a candidate's copy of the image never travels. A group row keeps the image
reference of its first row in input order; the group rows are then sorted by that reference and
:class:`JoinImages` reads each needed image straight from its input file, every row group about once.

Candidates are numbered in input order (file, then row), or by the configured candidate index
column; a group whose index column is null or repeats keeps the input order and is marked, so that
prepare records ``invalid_candidate_index`` for every candidate instead of writing colliding rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visualprm_ray.job import stages as col

if TYPE_CHECKING:
    import ray

    from visualprm_ray.job.inputs import InputFile
    from visualprm_ray.storage import StorageOptions


def _list_of(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    """All of ``values`` as the one list of a one-row list column."""
    flat = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)


def flat_to_group(
    table: pa.Table, *, passthrough: list[str], has_steps: bool, has_index: bool, with_image: bool
) -> pa.Table:
    """``map_groups`` function: the flat rows sharing an id -> one group row."""
    table = table.take(pc.sort_indices(table, [(col.FILE, "ascending"), (col.ROW, "ascending")]))
    n = len(table)
    # The image is taken from the first row in input order, whatever the candidate index says.
    image_ref = (table[col.FILE][0].as_py(), table[col.ROW][0].as_py())
    problem = None
    indices = pa.array(np.arange(n, dtype=np.int32))
    if has_index:
        given = table[col.CANDIDATE_INDEX].combine_chunks()
        if given.null_count:
            problem = f"the candidate index column has {given.null_count} null value(s) in this group"
        elif len(pc.unique(given)) != n:
            problem = "the candidate index column repeats a value in this group"
        else:
            order = pc.sort_indices(given)
            table = table.take(order)
            indices = table[col.CANDIDATE_INDEX].combine_chunks().cast(pa.int32())
    out: dict[str, Any] = {
        col.ID: table[col.ID].slice(0, 1),
        col.QUESTION: table[col.QUESTION].slice(0, 1),
        col.RESPONSES: _list_of(table[col.RESPONSES]),
        col.CANDIDATE_INDEX: _list_of(indices),
        col.INDEX_ERROR: pa.array([problem], pa.string()),
    }
    if has_steps:
        out[col.STEPS] = _list_of(table[col.STEPS])
    for name in passthrough:
        out[name] = _list_of(table[name])
    if with_image:
        out[col.IMAGE_FILE] = pa.array([image_ref[0]], pa.int32())
        out[col.IMAGE_ROW] = pa.array([image_ref[1]], pa.int64())
    return pa.table(out)


class JoinImages:
    """``map_batches`` callable: each group row gets the image of the input row it references.

    Rows arrive sorted by (file, row), so a batch needs a few consecutive row groups of a few
    files: each is read once here, image column only, and the referenced rows taken from it.
    """

    def __init__(
        self,
        files: ray.ObjectRef,
        storage: StorageOptions,
        *,
        column: str,
        image_type: pa.DataType,
        passthrough: str | None = None,
    ) -> None:
        self.files_ref = files
        self.passthrough = passthrough
        self.storage = storage
        self.column = column
        self.image_type = image_type

    def __call__(self, table: pa.Table) -> pa.Table:
        from visualprm_ray.job.stages.read import _object
        from visualprm_ray.storage import read_parquet

        files: list[InputFile] = _object(self.files_ref)
        file_of = table[col.IMAGE_FILE].to_numpy()
        row_of = table[col.IMAGE_ROW].to_numpy()
        parts: list[pa.Array] = []
        positions: list[np.ndarray] = []
        for f in np.unique(file_of):
            mine = np.flatnonzero(file_of == f)
            file = files[int(f)]
            starts = np.concatenate([[0], np.cumsum(file.row_group_rows, dtype=np.int64)])
            groups = np.searchsorted(starts, row_of[mine], side="right") - 1
            wanted = sorted({int(g) for g in groups})

            metadata = _object(file.footer) if file.footer is not None else None
            column = read_parquet(
                file.uri, [self.column], self.storage, size=file.size, metadata=metadata, row_groups=wanted
            )[self.column]
            # Offsets of the wanted row groups inside what was read.
            offset = dict(
                zip(wanted, np.cumsum([0] + [file.row_group_rows[g] for g in wanted[:-1]]), strict=True)
            )
            local = np.array(
                [offset[int(g)] + r - starts[g] for g, r in zip(groups, row_of[mine], strict=True)]
            )
            parts.append(column.take(pa.array(local, pa.int64())).combine_chunks().cast(self.image_type))
            positions.append(mine)
        if parts:
            # Back from file order to the batch's own row order.
            order = np.argsort(np.concatenate(positions), kind="stable")
            joined = pa.concat_arrays(parts).take(pa.array(order))
        else:
            joined = pa.array([], self.image_type)
        table = table.drop_columns([col.IMAGE_FILE, col.IMAGE_ROW]).append_column(col.IMAGE, joined)
        if self.passthrough is not None:
            lengths = pc.list_value_length(table[col.RESPONSES]).to_numpy(zero_copy_only=False)
            copies = joined.take(pa.array(np.repeat(np.arange(len(table)), lengths)))
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            table = table.append_column(self.passthrough, pa.ListArray.from_arrays(offsets, copies))
        return table
