"""What a rerun keeps of an interrupted run: readable files, each group once; and which jobs may resume."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.resume import (
    JOB_RECORD,
    ResumeConflict,
    check_job_record,
    job_record,
    scan_committed,
)
from visualprm_ray.schema import output_schema


def _config(out, *extra: str) -> JobConfig:
    return JobConfig.from_sources(
        None, ["output.mode=resume", *extra], input_uri="/in", output_uri=str(out), model_source="/model"
    )


def _write(path, keys: list[tuple[str, int | None]]) -> None:
    schema = output_schema()
    rows = [{"id": gid, "candidate_index": k, "is_best": False} for gid, k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema), path)


def test_nothing_there(tmp_path):
    assert scan_committed(_config(tmp_path / "absent")).groups == 0


def test_torn_and_duplicate_files_are_removed_and_the_rest_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "a-0.parquet", [("g1", 0), ("g1", 1), ("g2", 0)])
    _write(out / "a-1.parquet", [("g3", None)])  # a group without candidates: one row
    good = (out / "a-0.parquet").read_bytes()
    (out / "b-0.parquet").write_bytes(good[: len(good) // 2])  # killed mid-write
    (out / "b-1.parquet").write_bytes(b"")  # created, nothing written
    _write(out / "c-0.parquet", [("g2", 0), ("g4", 0)])  # a straggler's late commit of g2
    (out / "notes.txt").write_text("not ours")

    committed = scan_committed(_config(out))
    assert sorted(committed.ids.to_pylist()) == ["g1", "g2", "g3"]
    assert committed.candidates == 3 and committed.empty_groups == 1
    assert sorted(p.rsplit("/", 1)[-1] for p in committed.removed) == [
        "b-0.parquet",
        "b-1.parquet",
        "c-0.parquet",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a-0.parquet", "a-1.parquet", "notes.txt"]
    # g4 was only in the removed file: it is not committed, so the rerun scores it again.
    assert "g4" not in committed.ids.to_pylist()


def test_scan_without_delete_leaves_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b-0.parquet").write_bytes(b"PAR1 torn")
    committed = scan_committed(_config(out), delete=False)
    assert len(committed.removed) == 1 and (out / "b-0.parquet").exists()


def test_a_different_model_or_scoring_may_not_resume(tmp_path):
    out = tmp_path / "out"
    config = _config(out)
    a, b = _identity("A"), _identity("B")
    check_job_record(config, job_record(config, a))
    assert (out / JOB_RECORD).exists()
    check_job_record(config, job_record(config, a))  # the same job resumes
    with pytest.raises(ResumeConflict, match=r"model\.identity: \"sha256:"):
        check_job_record(config, job_record(config, b))
    other = _config(out, "scoring.max_steps=4")
    with pytest.raises(ResumeConflict, match=r"scoring\.max_steps: 12 -> 4"):
        check_job_record(other, job_record(other, a))
    # Runtime and throughput settings may change between attempts.
    tuned = _config(out, "runtime.groups_per_batch=2", "scoring.token_budget=4096")
    check_job_record(tuned, job_record(tuned, a))


def _identity(content: str):
    from visualprm_ray.model.source import ModelIdentity

    return ModelIdentity("content", {"model.safetensors": {"size": 1, "sha256": content}})


def test_only_the_jobs_own_top_level_files_count(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    _write(out / "a-0.parquet", [("g1", 0)])
    pq.write_table(pa.table({"x": [1]}), out / "mine" / "notes.parquet")  # a user's, not the job's
    monkeypatch.chdir(tmp_path)
    for uri in ("out", "out/", str(out), f"file://{out}"):
        committed = scan_committed(_config(uri))
        assert committed.ids.to_pylist() == ["g1"] and committed.removed == [], uri
    assert (out / "mine" / "notes.parquet").exists()
