"""The job with input, model and output on a real S3-protocol server (moto, loopback only)."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest
import s3fs

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import MANIFEST, SUCCESS, run_job
from visualprm_ray.sample_data import make_groups, write_shards
from visualprm_ray.storage import pyarrow_filesystem

pytestmark = pytest.mark.slow


def test_input_model_output_on_s3(ray_local, s3_env, tiny_model, tmp_path):
    bucket = s3_env
    fs = s3fs.S3FileSystem()
    write_shards(tmp_path / "in", make_groups(24, candidates=4, seed=0), 3)
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/rollouts/", recursive=True)
    fs.put(str(tiny_model) + "/", f"{bucket}/models/tiny/", recursive=True)
    config = JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            f"model.cache_dir={tmp_path / 'cache'}",
            "runtime.cpus_per_preparer=0.5",
            "runtime.progress_interval_s=5",
        ],
        input_uri=f"s3://{bucket}/rollouts/",
        output_uri=f"s3://{bucket}/scores/",
        model_source=f"s3://{bucket}/models/tiny",
    )
    manifest = run_job(config)
    assert manifest["counts"]["scored"] == manifest["counts"]["rows_out"] == 96

    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/scores/{SUCCESS}")
    stored = fs.cat_file(f"{bucket}/scores/{MANIFEST}").decode()
    assert json.loads(stored)["counts"]["scored"] == 96
    assert "testing" not in stored  # the (fake) credentials never reach the manifest
    pa_fs, path = pyarrow_filesystem(f"s3://{bucket}/scores/")
    table = pq.read_table(path, filesystem=pa_fs)
    con = duckdb.connect()
    con.register("scores", table)
    assert con.execute("select count(*), count(distinct (id, candidate_index)) from scores").fetchall() == [
        (96, 96)
    ]
    assert con.execute("select count(*) from scores where is_best").fetchall() == [(24,)]
    assert con.execute("select max(abs(score - list_avg(step_scores))) from scores").fetchall()[0][0] < 1e-6
    # The model was fetched into the local cache, without any checkpoint code: once whole for the
    # scorers, and its config and tokenizer alone for the preparers (no weights on CPU-only nodes).
    cached = sorted((p.parent for p in (tmp_path / "cache").glob("*/config.json")), key=lambda d: len(d.name))
    assert len(cached) == 2
    assert [bool(list(d.glob("*.safetensors"))) for d in cached] == [True, False]
    assert all((d / "tokenizer.model").exists() for d in cached)
    assert not list((tmp_path / "cache").rglob("*.py"))

    # A rerun of a finished job is a no-op (resume): nothing is written twice.
    again = run_job(config)
    assert again["counts"] == manifest["counts"]
    fs.invalidate_cache()
    assert len(pq.read_table(path, filesystem=pa_fs)) == 96
