"""The read stage's datasource, without a Ray cluster: read tasks are plain callables."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.inputs import InputFile
from visualprm_ray.job.stages.read import InputGroups, read_span, row_group_spans


@pytest.mark.parametrize(
    ("rows", "per_block", "spans"),
    [
        ([10, 10, 10], 16, [(0, 2), (2, 3)]),  # small row groups are read together
        ([100], 8, [(0, 1)]),  # a big one is one task (streamed out in blocks)
        ([3, 0, 3, 3], 4, [(0, 3), (3, 4)]),  # an empty row group rides along
        ([4, 4, 0, 0], 4, [(0, 1), (1, 2)]),  # trailing empty row groups are not a task
        ([0, 0], 4, []),
        ([], 4, []),
    ],
)
def test_row_group_spans(rows, per_block, spans):
    assert [(s.start, s.stop) for s in row_group_spans(rows, per_block)] == spans


def _file(path, n: int, row_group_size: int) -> InputFile:
    table = pa.table(
        {
            "id": [f"{path.stem}-{i}" for i in range(n)],
            "question": [f"q{i}" for i in range(n)],
            "unused": list(range(n)),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return InputFile.from_metadata(str(path), pq.ParquetFile(path).metadata)


def test_input_file_from_the_footer(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    assert file.row_group_rows == (5, 5, 2)
    assert len(file.row_group_bytes) == 3 and all(b > 0 for b in file.row_group_bytes)


SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string())])


def test_read_span_streams_blocks_of_the_projected_columns(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    blocks = list(
        read_span(pyarrow.fs.LocalFileSystem(), file.path, range(0, 3), schema=SCHEMA, rows_per_block=4)
    )
    assert all(len(b) <= 4 for b in blocks)
    table = pa.concat_tables(blocks)
    assert table.column_names == ["id", "question"]
    assert table["id"].to_pylist() == [f"a-{i}" for i in range(12)]


def test_derived_ids_are_the_relative_path_and_the_row_position(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    schema = pa.schema([("question", pa.string())])
    blocks = read_span(
        pyarrow.fs.LocalFileSystem(),
        file.path,
        range(1, 3),  # from the second row group on: rows 5..11
        schema=schema,
        rows_per_block=4,
        first_row=5,
        id_prefix="day1/a.parquet",
        file_index=7,
    )
    table = pa.concat_tables(list(blocks))
    assert table["_vp_id"].to_pylist() == [f"day1/a.parquet#{i}" for i in range(5, 12)]
    assert table["question"].to_pylist() == [f"q{i}" for i in range(5, 12)]
    assert set(table["_vp_file"].to_pylist()) == {7} and table["_vp_row"].to_pylist() == list(range(5, 12))


def test_blocks_are_cast_to_the_plans_types(tmp_path):
    """A file written with large_string (polars does) reads as the plan's string."""
    path = tmp_path / "large.parquet"
    pq.write_table(pa.table({"id": pa.array(["x"], pa.large_string()), "question": ["q"]}), path)
    (block,) = read_span(
        pyarrow.fs.LocalFileSystem(), str(path), range(0, 1), schema=SCHEMA, rows_per_block=4
    )
    assert block.schema == SCHEMA


def test_read_span_retries_a_transient_failure_without_repeating_rows(tmp_path):
    import fsspec.implementations.local
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    class Flaky(fsspec.implementations.local.LocalFileSystem):
        failures = 2

        def _open(self, *args, **kwargs):
            if Flaky.failures:
                Flaky.failures -= 1
                raise ConnectionError("connection reset by peer")
            return super()._open(*args, **kwargs)

    file = _file(tmp_path / "a.parquet", 12, 5)
    blocks = read_span(
        PyFileSystem(FSSpecHandler(Flaky(skip_instance_cache=True))),
        file.path,
        range(0, 3),
        schema=pa.schema([("id", pa.string())]),
        rows_per_block=5,
        retries=3,
    )
    ids = pa.concat_tables(list(blocks))["id"].to_pylist()
    assert Flaky.failures == 0
    assert ids == [f"a-{i}" for i in range(12)]


def _source(files, *, rows_per_block: int, derive_ids: bool = False) -> InputGroups:
    return InputGroups(
        files,
        pyarrow.fs.LocalFileSystem(),
        schema=SCHEMA,
        rows_per_block=rows_per_block,
        derive_ids=derive_ids,
    )


def test_every_row_is_read_exactly_once(tmp_path):
    files = [_file(tmp_path / "a.parquet", 12, 5), _file(tmp_path / "b.parquet", 3, 100)]
    source = _source(files, rows_per_block=4)
    tasks = source.get_read_tasks(parallelism=200)  # Ray Data's hint does not decide the tasks
    assert [t.metadata.num_rows for t in tasks] == [5, 5, 2, 3]
    assert sum(t.metadata.size_bytes for t in tasks) == source.estimate_inmemory_data_size()
    blocks = [block for task in tasks for block in task()]
    assert all(len(b) <= 4 for b in blocks)
    ids = pa.concat_tables(blocks)["id"].to_pylist()
    assert ids == [f"a-{i}" for i in range(12)] + [f"b-{i}" for i in range(3)]


def test_an_empty_input_is_one_empty_block_with_the_schema(tmp_path):
    files = [_file(tmp_path / "a.parquet", 0, 5)]
    tasks = _source(files, rows_per_block=4, derive_ids=True).get_read_tasks(parallelism=4)
    assert len(tasks) == 1
    (block,) = list(tasks[0]())
    assert len(block) == 0 and block.column_names == ["id", "question", "_vp_id"]
