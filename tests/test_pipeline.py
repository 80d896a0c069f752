"""Driver decisions that need no Ray: what an existing output directory means."""

from __future__ import annotations

import pytest

from visualprm_ray.config import JobConfig
from visualprm_ray.pipeline import MANIFEST, SUCCESS, prepare_output


def _config(out, mode: str) -> JobConfig:
    return JobConfig.from_sources(
        None, [f"output.mode={mode}"], input_uri="/in", output_uri=str(out), model_source="/model"
    )


def _fill(out, *, complete: bool):
    out.mkdir()
    (out / "part-1.parquet").write_bytes(b"stale")
    (out / "notes.txt").write_text("the user's own file")
    if complete:
        (out / MANIFEST).write_text("{}")
        (out / SUCCESS).write_text("")


def test_missing_or_empty_output_runs(tmp_path):
    assert prepare_output(_config(tmp_path / "none", "error")) is True
    (tmp_path / "empty").mkdir()
    assert prepare_output(_config(tmp_path / "empty", "error")) is True


def test_resume_of_a_complete_run_is_a_no_op(tmp_path):
    _fill(tmp_path / "out", complete=True)
    assert prepare_output(_config(tmp_path / "out", "resume")) is False
    assert (tmp_path / "out" / "part-1.parquet").exists()


@pytest.mark.parametrize(("mode", "complete"), [("resume", False), ("overwrite", True)])
def test_restart_clears_only_the_jobs_files(tmp_path, mode, complete):
    _fill(tmp_path / "out", complete=complete)
    assert prepare_output(_config(tmp_path / "out", mode)) is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_error_mode_refuses_an_existing_output(tmp_path):
    _fill(tmp_path / "out", complete=False)
    with pytest.raises(FileExistsError):
        prepare_output(_config(tmp_path / "out", "error"))
