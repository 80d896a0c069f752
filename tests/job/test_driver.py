"""Driver decisions that need no Ray: what an existing output directory means."""

from __future__ import annotations

import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import MANIFEST, SUCCESS, prepare_output
from visualprm_ray.job.resume import JOB_RECORD


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
    assert prepare_output(_config(tmp_path / "none", "error")) == "new"
    (tmp_path / "empty").mkdir()
    assert prepare_output(_config(tmp_path / "empty", "error")) == "new"


def test_resume_of_a_complete_run_says_so_and_keeps_everything(tmp_path):
    _fill(tmp_path / "out", complete=True)
    assert prepare_output(_config(tmp_path / "out", "resume")) == "complete"
    assert (tmp_path / "out" / "part-1.parquet").exists()


def test_resume_of_an_unfinished_run_keeps_its_files_for_the_scan(tmp_path):
    _fill(tmp_path / "out", complete=False)
    assert prepare_output(_config(tmp_path / "out", "resume")) == "partial"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JOB_RECORD, "notes.txt", "part-1.parquet"]


@pytest.mark.parametrize("complete", [False, True])
def test_overwrite_clears_only_the_jobs_files(tmp_path, complete):
    _fill(tmp_path / "out", complete=complete)
    (tmp_path / "out" / "nested").mkdir()
    (tmp_path / "out" / "nested" / "part-2.parquet").write_bytes(b"stale")
    assert prepare_output(_config(tmp_path / "out", "overwrite")) == "new"
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert left == ["nested", "nested/part-2.parquet", "notes.txt"]  # not the job's: left alone


def test_error_mode_refuses_an_existing_output(tmp_path):
    _fill(tmp_path / "out", complete=False)
    with pytest.raises(FileExistsError):
        prepare_output(_config(tmp_path / "out", "error"))
