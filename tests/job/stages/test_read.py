"""The read stage's datasource, without a Ray cluster: read tasks are plain callables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.inputs import FileSkip, InputFile
from visualprm_ray.job.stages.read import InputGroups, read_span, row_group_spans
from visualprm_ray.storage import StorageOptions

SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string())])
STORAGE = StorageOptions(retries=3)


@pytest.mark.parametrize(
    ("rows", "per_block", "spans"),
    [
        ([10, 10, 10], 16, [(0, 2), (2, 3)]),  # small row groups are read together
        ([100], 8, [(0, 1)]),  # a big one is one task (split into blocks by Ray Data)
        ([3, 0, 3, 3], 4, [(0, 3), (3, 4)]),  # an empty row group rides along
        ([4, 4, 0, 0], 4, [(0, 1), (1, 2)]),  # trailing empty row groups are not a task
        ([0, 0], 4, []),
        ([], 4, []),
    ],
)
def test_row_group_spans(rows, per_block, spans):
    assert [(s.start, s.stop) for s in row_group_spans(rows, per_block)] == spans


def _file(path, n: int, row_group_size: int, uri: str | None = None) -> InputFile:
    table = pa.table(
        {
            "id": [f"{path.stem}-{i}" for i in range(n)],
            "question": [f"q{i}" for i in range(n)],
            "unused": list(range(n)),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    metadata = pq.ParquetFile(path).metadata
    return InputFile.from_metadata(uri or str(path), metadata, size=path.stat().st_size)


def test_input_file_from_the_footer(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    assert file.row_group_rows == (5, 5, 2) and file.num_rows == 12
    assert len(file.row_group_bytes) == 3 and all(b > 0 for b in file.row_group_bytes)
    assert file.size == (tmp_path / "a.parquet").stat().st_size and file.relpath == "a.parquet"


def test_read_span_reads_the_projected_columns_of_its_row_groups(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    (table,) = read_span(file, [0, 2], [0, 10], schema=SCHEMA, storage=STORAGE)
    assert table.column_names == ["id", "question"]
    assert table["id"].to_pylist() == [f"a-{i}" for i in (0, 1, 2, 3, 4, 10, 11)]


def test_derived_ids_are_the_relative_path_and_the_row_position(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    file = InputFile(file.uri, file.row_group_rows, file.row_group_bytes, "day1/a.parquet", size=file.size)
    (table,) = read_span(
        file,
        [1, 2],  # rows 5..11
        [5, 10],
        schema=pa.schema([("question", pa.string())]),
        storage=STORAGE,
        id_prefix=file.relpath,
        file_index=7,
    )
    assert table["_vp_id"].to_pylist() == [f"day1/a.parquet#{i}" for i in range(5, 12)]
    assert table["question"].to_pylist() == [f"q{i}" for i in range(5, 12)]
    assert set(table["_vp_file"].to_pylist()) == {7} and table["_vp_row"].to_pylist() == list(range(5, 12))


def test_rows_an_earlier_attempt_committed_are_dropped_by_their_bitmap(tmp_path):
    file = _file(tmp_path / "a.parquet", 12, 5)
    committed = np.zeros(5, bool)
    committed[[1, 3]] = True
    (table,) = read_span(
        file, [0], [0], schema=SCHEMA, storage=STORAGE, drop={0: np.packbits(committed).tobytes()}
    )
    assert table["id"].to_pylist() == ["a-0", "a-2", "a-4"]


def test_blocks_are_cast_to_the_plans_types(tmp_path):
    """A file written with large_string (polars does) reads as the plan's string."""
    path = tmp_path / "large.parquet"
    pq.write_table(pa.table({"id": pa.array(["x"], pa.large_string()), "question": ["q"]}), path)
    file = InputFile.from_metadata(str(path), pq.ParquetFile(path).metadata)
    (block,) = read_span(file, [0], [0], schema=SCHEMA, storage=STORAGE)
    assert block.schema == SCHEMA


def test_read_span_retries_a_transient_failure_without_repeating_rows(tmp_path):
    import fsspec
    import fsspec.implementations.local

    class Flaky(fsspec.implementations.local.LocalFileSystem):
        protocol = "flaky"
        failures = 2

        def _open(self, *args, **kwargs):
            if Flaky.failures:
                Flaky.failures -= 1
                raise ConnectionError("connection reset by peer")
            kwargs.pop("cache_type", None)
            kwargs.pop("size", None)
            return super()._open(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            return path.removeprefix("flaky://")

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    file = _file(tmp_path / "a.parquet", 12, 5, uri=f"flaky://{tmp_path / 'a.parquet'}")
    (table,) = read_span(
        file, [0, 1, 2], [0, 5, 10], schema=pa.schema([("id", pa.string())]), storage=STORAGE
    )
    assert Flaky.failures == 0
    assert table["id"].to_pylist() == [f"a-{i}" for i in range(12)]


def _source(files, *, rows_per_block: int, derive_ids: bool = False, skip=None) -> InputGroups:
    return InputGroups(
        files, STORAGE, schema=SCHEMA, rows_per_block=rows_per_block, derive_ids=derive_ids, skip=skip
    )


def test_every_row_is_read_exactly_once(tmp_path):
    files = [_file(tmp_path / "a.parquet", 12, 5), _file(tmp_path / "b.parquet", 3, 100)]
    source = _source(files, rows_per_block=4)
    tasks = source.get_read_tasks(parallelism=200)  # Ray Data's hint does not decide the tasks
    assert [t.metadata.num_rows for t in tasks] == [5, 5, 2, 3]
    assert sum(t.metadata.size_bytes for t in tasks) == source.estimate_inmemory_data_size()
    blocks = [block for task in tasks for block in task()]
    ids = pa.concat_tables(blocks)["id"].to_pylist()
    assert ids == [f"a-{i}" for i in range(12)] + [f"b-{i}" for i in range(3)]


def test_committed_row_groups_and_files_cost_no_read_task(tmp_path):
    files = [_file(tmp_path / "a.parquet", 12, 5), _file(tmp_path / "b.parquet", 3, 100)]
    partly = np.packbits(np.array([True, False, False, False, False])).tobytes()
    skip = {0: FileSkip(frozenset({1}), {0: partly}), 1: FileSkip(frozenset({0}))}
    tasks = _source(files, rows_per_block=4, skip=skip).get_read_tasks(parallelism=8)
    assert [t.metadata.num_rows for t in tasks] == [5, 2]  # row groups 0 and 2 of a; nothing of b
    ids = pa.concat_tables([b for t in tasks for b in t()])["id"].to_pylist()
    assert ids == [f"a-{i}" for i in (1, 2, 3, 4, 10, 11)]


def test_an_empty_input_is_one_empty_block_with_the_schema(tmp_path):
    files = [_file(tmp_path / "a.parquet", 0, 5)]
    tasks = _source(files, rows_per_block=4, derive_ids=True).get_read_tasks(parallelism=4)
    assert len(tasks) == 1
    (block,) = list(tasks[0]())
    assert len(block) == 0 and block.column_names == ["id", "question", "_vp_id"]
