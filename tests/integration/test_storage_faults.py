"""Storage faults injected into the real job: transient ones are retried, persistent ones fail it.

Every request of the job (Parquet input, image objects, model download, Parquet output, manifest)
goes to a fault-injecting proxy in front of the loopback moto server (:mod:`s3_faults`); the proxy
answers chosen requests with real S3 errors (503 ``SlowDown``, 500 ``InternalError``) and logs
every request, so the tests can assert that the retries really went over the wire.

The session's Ray workers inherit ``AWS_ENDPOINT_URL`` = moto itself (``ray_local``), so a job
reaches the proxy only through ``storage.endpoint_url``: a request that shows up in the proxy's
log from a Ray worker (image reads, model files, output writes) proves that the config endpoint
reached that code path.

Three layers can retry a failed request, and the tests size their faults against them:

1. botocore, per request: ``legacy`` retry mode, 5 attempts in all by default, for any 5xx and
   the throttling codes (:func:`_botocore_attempts`). The workers' environment is fixed when the
   session's Ray starts, so ``AWS_MAX_ATTEMPTS`` cannot be lowered for one test; the faults are
   counted in units of this budget instead;
2. s3fs, around each call: up to 5 more tries when the error text says ``SlowDown``; anything
   else (``InternalError``) is raised after botocore gives up;
3. :func:`visualprm_ray.storage.with_retries` (``storage.retries``), around image reads, listings
   and model downloads: it sees only what 1 and 2 gave up on.

A fault of ``botocore_attempts`` x 500 therefore reaches our own retry layer, and nothing else
can save the read: that is how the transient-read test proves ``storage.retries`` is at work.

Writes go through ``ds.write_parquet`` on the pyarrow-wrapped s3fs of
:func:`visualprm_ray.storage.pyarrow_filesystem`, whose output streams upload each file in one
call under ``with_retries`` (layer 3), so a write that keeps failing ends the job with a
``StorageError`` naming the object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from s3_faults import FaultProxy

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import SUCCESS, run_job
from visualprm_ray.sample_data import make_groups, write_shards
from visualprm_ray.storage import pyarrow_filesystem

pytestmark = pytest.mark.slow

GROUPS, CANDIDATES = 4, 2
IMAGE_KEYS = [f"images/figures/geo-{i:05d}.png" for i in range(GROUPS)]


def _botocore_attempts() -> int:
    """Attempts per request that botocore makes on a 5xx, in the environment the Ray workers got
    (the ``ray_local`` fixture sets no retry variables, so botocore's own default applies)."""
    if os.environ.get("AWS_MAX_ATTEMPTS"):
        return int(os.environ["AWS_MAX_ATTEMPTS"])
    assert os.environ.get("AWS_RETRY_MODE", "legacy") == "legacy", "the fault budgets assume legacy mode"
    from botocore.loaders import Loader

    return int(Loader().load_data("_retry")["retry"]["__default__"]["max_attempts"])


@pytest.fixture
def fault_proxy(s3_server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def job_inputs(s3_env, tiny_model, tmp_path) -> str:
    """Rollouts whose images are separate objects referenced by relative key, and the model, all
    in the test's bucket; uploaded straight to moto (``AWS_ENDPOINT_URL``), not through the proxy."""
    bucket = s3_env
    write_shards(
        tmp_path / "in",
        make_groups(GROUPS, candidates=CANDIDATES, seed=0),
        2,
        image_mode="relative_path",
        images_dir=tmp_path / "images",
    )
    fs = s3fs.S3FileSystem()
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/rollouts/", recursive=True)
    fs.put(str(tmp_path / "images") + "/", f"{bucket}/images/", recursive=True)
    fs.put(str(tiny_model) + "/", f"{bucket}/models/tiny/", recursive=True)
    assert sorted(fs.find(f"{bucket}/images/")) == [f"{bucket}/{k}" for k in IMAGE_KEYS]
    return bucket


def _config(bucket: str, proxy: FaultProxy, tmp_path: Path, *, retries: int) -> JobConfig:
    return JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            # Per test: every job downloads the model again, through the proxy.
            f"model.cache_dir={tmp_path / 'cache'}",
            "runtime.cpus_per_preparer=0.5",
            # One preparer: one fewer process to start on a 2-core CI box; 4 groups are one batch anyway.
            "runtime.num_preparers=1",
            "runtime.progress_interval_s=5",
            "output.mode=overwrite",
            f"images.root=s3://{bucket}/images",
            f"storage.endpoint_url={proxy.endpoint_url}",
            f"storage.retries={retries}",
        ],
        input_uri=f"s3://{bucket}/rollouts/",
        output_uri=f"s3://{bucket}/scores/",
        model_source=f"s3://{bucket}/models/tiny",
    )


def _output_keys(bucket: str) -> list[tuple[str, int]]:
    """(id, candidate_index) of every output row, read straight from moto."""
    fs, path = pyarrow_filesystem(f"s3://{bucket}/scores/")
    table = pq.read_table(path, filesystem=fs, columns=["id", "candidate_index"])
    return list(zip(table["id"].to_pylist(), table["candidate_index"].to_pylist(), strict=True))


def _statuses(proxy: FaultProxy, method: str, key: str) -> list[int | str]:
    """The answers to ``method`` on exactly ``key``, in order; any 2xx (a ranged GET is a 206) as "ok"."""
    return ["ok" if 200 <= r.status < 300 else r.status for r in proxy.requests(method, key) if r.key == key]


def _parquet_puts(proxy: FaultProxy, bucket: str) -> list[str]:
    """The output Parquet objects the job tried to write (each small enough for one PutObject)."""
    return sorted({r.key for r in proxy.requests("PUT", f"{bucket}/scores/") if r.key.endswith(".parquet")})


def test_transient_read_faults_are_retried(ray_local, job_inputs, fault_proxy, tmp_path):
    bucket, proxy = job_inputs, fault_proxy
    attempts = _botocore_attempts()
    # Rules are tried in order. One image fails as often as botocore tries, so its error reaches
    # our layer and only storage.retries can get it read ...
    outlasting = proxy.fail(
        method="GET", key_contains=f"{bucket}/{IMAGE_KEYS[1]}", status=500, times=attempts
    )
    # ... every image object (that one too, after its 500s) throttles its first 2 GETs ...
    throttled = proxy.fail(method="GET", key_contains=f"{bucket}/images/", status=503, times=2, per_key=True)
    # ... and so does the first GET of each input Parquet file (pyarrow over fsspec).
    parquet = proxy.fail(
        method="GET", key_contains=f"{bucket}/rollouts/", key_suffix=".parquet", status=503, per_key=True
    )
    manifest = run_job(_config(bucket, proxy, tmp_path, retries=2), emit=lambda *_: None)

    counts = manifest["counts"]
    assert counts["scored"] == counts["rows_out"] == GROUPS * CANDIDATES
    assert counts["errored"] == 0
    assert sorted(_output_keys(bucket)) == sorted(
        (f"geo-{i:05d}", k) for i in range(GROUPS) for k in range(CANDIDATES)
    )
    assert proxy.injected(outlasting) == attempts
    assert proxy.injected(throttled) == 2 * GROUPS
    assert proxy.injected(parquet) == 2  # two input shards
    for key in IMAGE_KEYS:
        # Each failed GET was retried until one succeeded: the retries went over the wire.
        expected = [500] * attempts if key == IMAGE_KEYS[1] else []
        assert _statuses(proxy, "GET", f"{bucket}/{key}") == [*expected, 503, 503, "ok"], key
    # The config endpoint reached the Ray workers' I/O too (their environment points at moto):
    # the model files (only the actors download them) and the output (the write tasks).
    assert _statuses(proxy, "GET", f"{bucket}/models/tiny/model.safetensors")
    assert _parquet_puts(proxy, bucket)


def test_persistent_read_fault_fails_the_job_naming_the_object(ray_local, job_inputs, fault_proxy, tmp_path):
    bucket, proxy = job_inputs, fault_proxy
    broken = IMAGE_KEYS[2]
    rule = proxy.fail(method="GET", key_contains=f"{bucket}/{broken}", status=500, times=-1)
    # storage.retries=1: two rounds of botocore's attempts, then the job must give up.
    with pytest.raises(Exception) as failure:
        run_job(_config(bucket, proxy, tmp_path, retries=1), emit=lambda *_: None)

    message = str(failure.value)
    # A storage failure, not a row error: the job stops, naming the object and the cause.
    assert f"StorageError: reading image s3://{bucket}/{broken}: failed after 2 attempt(s)" in message
    assert "internal error" in message
    assert "testing" not in message  # the (fake) credentials are not echoed
    assert proxy.injected(rule) == 2 * _botocore_attempts()
    assert set(_statuses(proxy, "GET", f"{bucket}/{broken}")) == {500}
    assert not s3fs.S3FileSystem().exists(f"{bucket}/scores/{SUCCESS}")


def test_transient_write_faults_are_retried(ray_local, job_inputs, fault_proxy, tmp_path):
    bucket, proxy = job_inputs, fault_proxy
    # The first 2 PUTs of every output Parquet object throttle.
    rule = proxy.fail(
        method="PUT",
        key_contains=f"{bucket}/scores/",
        key_suffix=".parquet",
        status=503,
        times=2,
        per_key=True,
    )
    manifest = run_job(_config(bucket, proxy, tmp_path, retries=2), emit=lambda *_: None)

    counts = manifest["counts"]
    assert counts["scored"] == counts["rows_out"] == counts["rows_total"] == GROUPS * CANDIDATES
    assert counts["duplicates"] == counts["missing"] == 0
    written = _parquet_puts(proxy, bucket)
    assert written
    assert proxy.injected(rule) == 2 * len(written)
    for key in written:
        assert _statuses(proxy, "PUT", key) == [503, 503, "ok"], key
    # Exactly once: no object left behind by a retry, no row twice.
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert sorted(fs.glob(f"{bucket}/scores/*.parquet")) == written
    keys = _output_keys(bucket)
    assert len(keys) == len(set(keys)) == GROUPS * CANDIDATES
    assert fs.exists(f"{bucket}/scores/{SUCCESS}")


def test_persistent_write_fault_fails_the_job(ray_local, job_inputs, fault_proxy, tmp_path):
    bucket, proxy = job_inputs, fault_proxy
    rule = proxy.fail(
        method="PUT", key_contains=f"{bucket}/scores/", key_suffix=".parquet", status=500, times=-1
    )
    with pytest.raises(Exception) as failure:
        run_job(_config(bucket, proxy, tmp_path, retries=1), emit=lambda *_: None)

    message = str(failure.value)
    # Failed, rather than hanging or claiming success, and only after retrying.
    assert proxy.injected(rule) >= _botocore_attempts()
    assert all(set(_statuses(proxy, "PUT", key)) == {500} for key in _parquet_puts(proxy, bucket))
    assert "internal error" in message
    assert "testing" not in message
    assert not s3fs.S3FileSystem().exists(f"{bucket}/scores/{SUCCESS}")
    # Our layer retried too (storage.retries=1: two rounds of botocore's attempts), then named the file.
    assert proxy.injected(rule) == 2 * _botocore_attempts()
    assert "StorageError" in message and f"write s3://{bucket}/scores/" in message
    assert "failed after 2 attempt(s)" in message
