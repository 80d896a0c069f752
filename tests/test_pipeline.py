"""Driver decisions that need no Ray: what an existing output directory means."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from visualprm_ray.config import JobConfig
from visualprm_ray.pipeline import MANIFEST, SUCCESS, Counts, prepare_output
from visualprm_ray.resume import JOB_RECORD


def _config(out, mode: str) -> JobConfig:
    return JobConfig.from_sources(
        None, [f"output.mode={mode}"], input_uri="/in", output_uri=str(out), model_source="/model"
    )


def _fill(out, *, complete: bool):
    out.mkdir()
    (out / "part-1.parquet").write_bytes(b"stale")
    (out / "notes.txt").write_text("the user's own file")
    (out / JOB_RECORD).write_text("{}")
    if complete:
        (out / MANIFEST).write_text("{}")
        (out / SUCCESS).write_text("")
        (out / "_report.html").write_text("<html></html>")


def test_missing_or_empty_output_runs(tmp_path):
    assert prepare_output(_config(tmp_path / "none", "error")) is True
    (tmp_path / "empty").mkdir()
    assert prepare_output(_config(tmp_path / "empty", "error")) is True


def test_resume_of_a_complete_run_is_a_no_op(tmp_path):
    _fill(tmp_path / "out", complete=True)
    assert prepare_output(_config(tmp_path / "out", "resume")) is False
    assert (tmp_path / "out" / "part-1.parquet").exists()


def test_resume_of_an_unfinished_run_keeps_its_files_for_the_scan(tmp_path):
    _fill(tmp_path / "out", complete=False)
    assert prepare_output(_config(tmp_path / "out", "resume")) is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JOB_RECORD, "notes.txt", "part-1.parquet"]


@pytest.mark.parametrize("complete", [False, True])
def test_overwrite_clears_only_the_jobs_files(tmp_path, complete):
    _fill(tmp_path / "out", complete=complete)
    (tmp_path / "out" / "nested").mkdir()
    (tmp_path / "out" / "nested" / "part-2.parquet").write_bytes(b"stale")
    assert prepare_output(_config(tmp_path / "out", "overwrite")) is True
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert left == ["nested", "nested/part-2.parquet", "notes.txt"]  # not the job's: left alone


def test_counts_name_every_way_the_output_can_be_wrong():
    ok = Counts(candidates_in=10, scored=6, errored=1, skipped=3)
    assert ok.problems() == []
    lost = Counts(candidates_in=10, scored=6, errored=1, skipped=2, missing=1)
    assert [p.split(" ")[0] for p in lost.problems()] == ["candidates", "1"]
    doubled = Counts(candidates_in=10, scored=7, errored=1, skipped=3, duplicates=1)
    assert len(doubled.problems()) == 2 and "more than once" in doubled.problems()[1]
    empty = Counts(candidates_in=0, empty_groups=2, empty_group_rows=1)
    assert empty.problems() == ["2 group(s) without candidates in the input, 1 such row(s) in the output"]


def test_error_mode_refuses_an_existing_output(tmp_path):
    _fill(tmp_path / "out", complete=False)
    with pytest.raises(FileExistsError):
        prepare_output(_config(tmp_path / "out", "error"))


def _input(path, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(exist_ok=True)
    rows = [{"id": i, "question": "Q?", "responses": ["a", "b"]} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_repeated_or_null_group_ids_are_refused_before_the_job(tmp_path):
    from visualprm_ray.pipeline import count_input
    from visualprm_ray.stages.read import plan_read

    _input(tmp_path / "in" / "a.parquet", ["g1", "g2"])
    _input(tmp_path / "in" / "b.parquet", ["g3", "g2"])
    config = JobConfig.from_sources(
        None, [], input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_source="/m"
    )
    with pytest.raises(ValueError, match="'g2' appears more than once"):
        count_input(config, plan_read(config))
    _input(tmp_path / "in" / "b.parquet", ["g3", None])
    with pytest.raises(ValueError, match="null 'id'"):
        count_input(config, plan_read(config))
    _input(tmp_path / "in" / "b.parquet", ["g3", "g4"])
    counts, files = count_input(config, plan_read(config))
    assert (counts.groups_in, counts.candidates_in) == (4, 8)
    # The same pass indexes each file's row groups for the read stage.
    assert [(f.path.rsplit("/", 1)[-1], f.row_group_rows) for f in files] == [
        ("a.parquet", (2,)),
        ("b.parquet", (2,)),
    ]


@pytest.mark.parametrize(
    ("overrides", "layout", "rows", "expected"),
    [
        ([], "grouped", 1000, 8),  # one batch of groups per block by default
        (["runtime.groups_per_batch=3"], "grouped", 1000, 3),
        (["input.num_blocks=4"], "grouped", 20, 5),  # spread over about that many blocks
        (["input.num_blocks=2"], "grouped", 1000, 32),  # but never more than 4 batches each
        (["input.num_blocks=1000"], "grouped", 10, 1),
        ([], "flat", 1000, 128),  # flat rows are candidates
    ],
)
def test_rows_per_block(overrides, layout, rows, expected):
    from visualprm_ray.pipeline import rows_per_block

    config = JobConfig.from_sources(None, overrides, input_uri="/in", output_uri="/out", model_source="/m")

    plan = SimpleNamespace(layout=layout)  # only the layout matters here
    assert rows_per_block(config, plan, rows) == expected
