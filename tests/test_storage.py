"""Storage: URIs, filesystems, redaction, retries and the model cache, against a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from visualprm_ray import storage
from visualprm_ray.storage import (
    StorageError,
    StorageOptions,
    fsspec_filesystem,
    list_files,
    local_model_dir,
    pyarrow_filesystem,
    redact,
    split_uri,
    with_retries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _put(bucket: str, key: str, body: bytes) -> None:
    _s3_client().put_object(Bucket=bucket, Key=key, Body=body)


# --------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------


def test_split_uri() -> None:
    assert split_uri("/data/x.parquet") == ("file", "/data/x.parquet")
    assert split_uri("rel/dir") == ("file", "rel/dir")
    assert split_uri("file:///data/x") == ("file", "/data/x")
    assert split_uri("s3://bucket/a/b.parquet") == ("s3", "bucket/a/b.parquet")
    assert split_uri("GS://bucket/k") == ("gs", "bucket/k")


def test_options_forbid_unknown_fields_and_hold_no_credentials() -> None:
    with pytest.raises(ValueError, match="extra"):
        StorageOptions(aws_secret_access_key="x")  # type: ignore[call-arg]
    assert set(StorageOptions.model_fields) == {"endpoint_url", "anon", "region", "retries"}
    assert all(f.description for f in StorageOptions.model_fields.values())
    with pytest.raises(ValueError):
        StorageOptions(retries=-1)


def test_local_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs

    monkeypatch.chdir(tmp_path)
    fs, path = fsspec_filesystem("sub/dir")
    assert path == str(tmp_path / "sub" / "dir")
    assert "file" in fs.protocol
    pfs, ppath = pyarrow_filesystem("file://" + str(tmp_path))
    assert isinstance(pfs, pyarrow.fs.LocalFileSystem)
    assert ppath == str(tmp_path)


def test_s3_filesystem_options_are_passed(s3_env: str) -> None:
    fs, path = fsspec_filesystem(
        f"s3://{s3_env}/prefix/", StorageOptions(endpoint_url="http://127.0.0.1:1", region="eu-west-3")
    )
    assert path == f"{s3_env}/prefix"
    assert fs.client_kwargs == {"region_name": "eu-west-3"}
    assert fs.endpoint_url == "http://127.0.0.1:1"
    anon_fs, _ = fsspec_filesystem(f"s3://{s3_env}", StorageOptions(anon=True))
    assert anon_fs.anon is True


def test_parquet_roundtrip_on_s3_via_env_endpoint(s3_env: str) -> None:
    """No endpoint in the options: AWS_ENDPOINT_URL (set by the fixture) must be honoured."""
    import pyarrow as pa
    import pyarrow.fs
    import pyarrow.parquet as pq

    pfs, path = pyarrow_filesystem(f"s3://{s3_env}/tables")
    assert isinstance(pfs, pyarrow.fs.PyFileSystem)
    assert path == f"{s3_env}/tables"
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=pfs)
    # Visible through plain boto3 too, i.e. it really went to the server.
    keys = [o["Key"] for o in _s3_client().list_objects_v2(Bucket=s3_env)["Contents"]]
    assert keys == ["tables/part-0.parquet"]
    assert pq.read_table(f"{path}/part-0.parquet", filesystem=pfs).equals(table)


def test_list_files_s3_prefix_and_glob(s3_env: str) -> None:
    for key in (
        "data/a.parquet",
        "data/sub/b.parquet",
        "data/_SUCCESS",
        "data/_temporary/c.parquet",
        "data/.tmp.parquet",
        "data/notes.txt",
        "data-other/d.parquet",  # shares the string prefix, not the directory
    ):
        _put(s3_env, key, b"x")
    assert list_files(f"s3://{s3_env}/data") == [
        f"s3://{s3_env}/data/a.parquet",
        f"s3://{s3_env}/data/sub/b.parquet",
    ]
    assert list_files(f"s3://{s3_env}/data/", suffix=".txt") == [f"s3://{s3_env}/data/notes.txt"]
    assert list_files(f"s3://{s3_env}/data/", recursive=False) == [f"s3://{s3_env}/data/a.parquet"]
    assert list_files(f"s3://{s3_env}/data/*.parquet") == [f"s3://{s3_env}/data/a.parquet"]
    assert list_files(f"s3://{s3_env}/data*/*.parquet") == [
        f"s3://{s3_env}/data-other/d.parquet",
        f"s3://{s3_env}/data/a.parquet",
    ]
    assert list_files(f"s3://{s3_env}/data/a.parquet") == [f"s3://{s3_env}/data/a.parquet"]
    # A listing taken before a write must not hide the new file: s3fs caches directory listings in
    # its (shared) instances, and glob/isfile read that cache.
    _put(s3_env, "data/z.parquet", b"x")
    assert list_files(f"s3://{s3_env}/data")[-1] == f"s3://{s3_env}/data/z.parquet"
    assert list_files(f"s3://{s3_env}/data/*.parquet")[-1] == f"s3://{s3_env}/data/z.parquet"
    with pytest.raises(FileNotFoundError):
        list_files(f"s3://{s3_env}/missing")


def test_list_files_local(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "_tmp").mkdir()
    for name in ("b.parquet", "sub/a.parquet", "_SUCCESS", ".hidden.parquet", "_tmp/x.parquet", "c.csv"):
        (tmp_path / name).write_bytes(b"x")
    assert list_files(str(tmp_path)) == [str(tmp_path / "b.parquet"), str(tmp_path / "sub" / "a.parquet")]
    assert list_files(str(tmp_path / "*.parquet")) == [str(tmp_path / "b.parquet")]
    assert list_files(str(tmp_path), recursive=False) == [str(tmp_path / "b.parquet")]
    assert list_files(f"file://{tmp_path}", suffix=".csv") == [str(tmp_path / "c.csv")]
    with pytest.raises(FileNotFoundError):
        list_files(str(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("key id AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE"),
        ("temp ASIAXXXXXXXXXXXXXXXX", "ASIAXXXXXXXXXXXXXXXX"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
        ('{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"}', "wJalrXUtnFEMI"),
        ("{'secret': 'hunter2'}", "hunter2"),
        ("AWS_SESSION_TOKEN=FwoGZXIvYXdzEJr", "FwoGZXIvYXdzEJr"),
        ("password: correct horse", "correct"),
        ('"password": "correct horse"', "horse"),
        ("token=abc123&other=1", "abc123"),
        ("connect https://alice:s3cr3t@minio.internal:9000/bucket failed", "s3cr3t"),
        ("https://u?X-Amz-Security-Token=IQoJb3JpZ2lu&X-Amz-Signature=deadbeef", "IQoJb3JpZ2lu"),
        ("https://u?X-Amz-Security-Token=IQoJb3JpZ2lu&X-Amz-Signature=deadbeef", "deadbeef"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9"),
    ],
)
def test_redact_removes_credentials(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_ordinary_text() -> None:
    for text in (
        "read 1024 rows from s3://bucket/data/part-0.parquet in 1.5s",
        "max_new_tokens: 512, tokenizer_path=/models/tok, num_tokens=3",
        "step 3 of 7: the answer is 42",
        "AKIA is a prefix",
    ):
        assert redact(text) == text
    assert redact("https://alice:pw@host/x") == "https://***@host/x"
    assert redact('{"token": "abc", "batch_size": 8}') == '{"token": "***", "batch_size": 8}'


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


def test_with_retries_recovers_from_transient_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert with_retries(flaky, what="read thing", retries=5, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_with_retries_does_not_retry_missing_files() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="read thing", retries=5, base_delay=0.001)
    assert len(calls) == 1


def test_with_retries_gives_up_with_storage_error() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("timed out talking to https://bob:pw@host/")

    with pytest.raises(StorageError, match="write s3://b/out") as info:
        with_retries(down, what="write s3://b/out", retries=2, base_delay=0.001)
    assert len(calls) == 3
    assert "pw@" not in str(info.value)
    assert isinstance(info.value.__cause__, TimeoutError)


def test_with_retries_classifies_botocore_errors() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    for exc, retried in (
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("AccessDenied", 403), False),
    ):
        calls = []

        def fail(exc: Exception = exc, calls: list[int] = calls) -> None:
            calls.append(1)
            raise exc

        with pytest.raises((StorageError, ClientError)):
            with_retries(fail, what="op", retries=1, base_delay=0.001)
        assert len(calls) == (2 if retried else 1), exc


# --------------------------------------------------------------------------------------------
# Model cache
# --------------------------------------------------------------------------------------------

MODEL_FILES = {
    "config.json": b'{"model_type": "internvl_chat"}',
    "model.safetensors": bytes(range(256)) * 40,
    "tokenizer.model": b"sentencepiece-bytes",
    "special_tokens_map.txt": b"<s>\n</s>\n",
    "modeling_x.py": b"raise SystemExit('checkpoint code must never be fetched')",
    "optimizer.pt": b"not needed",
}


@pytest.fixture
def remote_model(s3_env: str) -> str:
    for name, body in MODEL_FILES.items():
        _put(s3_env, f"models/VisualPRM-tiny/{name}", body)
    _put(s3_env, "models/VisualPRM-tiny-old/config.json", b"{}")  # a sibling sharing the name prefix
    return f"s3://{s3_env}/models/VisualPRM-tiny"


@pytest.fixture
def download_counter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = storage._download_tree

    def counting(fs, root, listing, dest, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(dest)
        return real(fs, root, listing, dest, **kwargs)

    monkeypatch.setattr(storage, "_download_tree", counting)
    return calls


def _assert_matches_remote(target: Path) -> None:
    wanted = {k: v for k, v in MODEL_FILES.items() if not k.endswith((".py", ".pt"))}
    assert sorted(p.name for p in target.iterdir() if p.name != storage.MARKER_NAME) == sorted(wanted)
    for name, body in wanted.items():
        assert (target / name).read_bytes() == body


def test_local_model_dir_returns_local_dirs_and_rejects_hub_ids(tmp_path: Path) -> None:
    assert local_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(StorageError, match="does not exist"):
        local_model_dir("OpenGVLab/VisualPRM-8B", cache_dir=tmp_path / "cache")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        local_model_dir(str(tmp_path / "f"))


def test_local_model_dir_downloads_once_and_only_needed_files(
    remote_model: str, tmp_path: Path, download_counter: list[Path]
) -> None:
    cache = tmp_path / "cache"
    target = local_model_dir(remote_model, cache_dir=cache)
    assert target.parent == cache
    assert target.name.startswith("VisualPRM-tiny-")
    _assert_matches_remote(target)
    assert not list(target.rglob("*.py"))
    marker = json.loads((target / storage.MARKER_NAME).read_text())
    assert marker["files"]["model.safetensors"]["size"] == len(MODEL_FILES["model.safetensors"])
    assert marker["files"]["model.safetensors"]["etag"]
    assert len(download_counter) == 1

    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert local_model_dir(remote_model, cache_dir=cache) == target
    assert len(download_counter) == 1
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    # Only the target and its lock: no temporary siblings left behind.
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f"{target.name}.lock"])


def test_local_model_dir_default_cache_from_env(
    remote_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISUALPRM_CACHE", str(tmp_path / "envcache"))
    assert local_model_dir(remote_model).parent == tmp_path / "envcache"


def test_local_model_dir_refetches_partial_or_corrupt_cache(
    remote_model: str, tmp_path: Path, download_counter: list[Path]
) -> None:
    cache = tmp_path / "cache"
    target = local_model_dir(remote_model, cache_dir=cache)

    with open(target / "model.safetensors", "r+b") as f:  # a download cut short
        f.truncate(100)
    assert local_model_dir(remote_model, cache_dir=cache) == target
    assert len(download_counter) == 2
    _assert_matches_remote(target)

    (target / "tokenizer.model").unlink()  # a file gone missing
    local_model_dir(remote_model, cache_dir=cache)
    assert len(download_counter) == 3
    _assert_matches_remote(target)

    (target / storage.MARKER_NAME).unlink()  # never completed (e.g. killed before the marker)
    local_model_dir(remote_model, cache_dir=cache)
    assert len(download_counter) == 4
    _assert_matches_remote(target)


def test_local_model_dir_refetches_when_remote_changes(
    remote_model: str, s3_env: str, tmp_path: Path, download_counter: list[Path]
) -> None:
    cache = tmp_path / "cache"
    target = local_model_dir(remote_model, cache_dir=cache)
    # Same size, different bytes: only the ETag tells them apart.
    new_weights = bytes(reversed(MODEL_FILES["model.safetensors"]))
    _put(s3_env, "models/VisualPRM-tiny/model.safetensors", new_weights)
    assert local_model_dir(remote_model, cache_dir=cache) == target
    assert len(download_counter) == 2
    assert (target / "model.safetensors").read_bytes() == new_weights

    _put(s3_env, "models/VisualPRM-tiny/extra.json", b"{}")  # a new file
    local_model_dir(remote_model, cache_dir=cache)
    assert len(download_counter) == 3
    assert (target / "extra.json").read_bytes() == b"{}"
    assert local_model_dir(remote_model, cache_dir=cache) == target
    assert len(download_counter) == 3


def test_local_model_dir_failed_refetch_keeps_old_copy_and_cleans_up(
    remote_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    target = local_model_dir(remote_model, cache_dir=cache)
    stale = cache / f".{target.name}.tmp-999-deadbeef"  # left by a process killed mid-download
    (stale / "sub").mkdir(parents=True)
    (target / storage.MARKER_NAME).unlink()

    def broken(fs, root, listing, dest, **kwargs):  # type: ignore[no-untyped-def]
        (dest / "config.json").write_bytes(b"half")
        raise StorageError("download s3://...: failed after 6 attempt(s)")

    real = storage._download_tree
    monkeypatch.setattr(storage, "_download_tree", broken)
    with pytest.raises(StorageError, match="failed after"):
        local_model_dir(remote_model, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f"{target.name}.lock"])
    assert (target / "config.json").read_bytes() == MODEL_FILES["config.json"]
    monkeypatch.setattr(storage, "_download_tree", real)
    assert local_model_dir(remote_model, cache_dir=cache) == target
    _assert_matches_remote(target)


def test_local_model_dir_missing_remote_raises(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no model files"):
        local_model_dir(f"s3://{s3_env}/nothing/here", cache_dir=tmp_path)


def test_local_model_dir_unreachable_endpoint_raises_storage_error(
    tmp_path: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore retries connection errors itself (5 attempts, ~6 s with backoff) under our retries;
    # one attempt per call keeps this test fast and still exercises our retry loop.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    calls = []
    real = storage._remote_listing

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "_remote_listing", counting)
    # Port 9 on loopback: nothing listens, so every attempt is a connection error.
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", retries=2)
    with pytest.raises(StorageError, match=r"list s3://bkt-x/model: failed after 3 attempt"):
        local_model_dir("s3://bkt-x/model", options, cache_dir=tmp_path)
    assert len(calls) == 3


_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from visualprm_ray import storage

    real = storage._download_tree

    def logged(*args, **kwargs):
        with open(os.environ["DOWNLOAD_LOG"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(0.5)  # widen the window in which the others try to download too
        return real(*args, **kwargs)

    storage._download_tree = logged
    start = float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))  # all processes hit the cache at the same moment
    print(storage.local_model_dir(sys.argv[1], cache_dir=sys.argv[2]))
    """
)


def test_local_model_dir_concurrent_processes_download_once(remote_model: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "downloads.log"
    env = {**os.environ, "DOWNLOAD_LOG": str(log), "PYTHONPATH": str(REPO_ROOT)}
    start = time.time() + 3.0  # enough for every interpreter to import s3fs first
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, remote_model, str(cache), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert len(log.read_text().split()) == 1
    _assert_matches_remote(target)
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f"{target.name}.lock"])


def test_parallel_imap_keeps_order_bounds_work_in_flight_and_stops_on_error() -> None:
    import threading
    import time

    from visualprm_ray.storage import parallel_imap, parallel_map

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (7 - i % 7))  # later items finish first: order must come from the index
        return i * i

    results = parallel_imap(work, 50, threads=4)
    assert next(results) == 0
    time.sleep(0.05)
    assert len(started) <= 5  # 4 in flight, one taken: nothing read far ahead of the consumer
    assert [0, *results] == [i * i for i in range(50)]
    assert parallel_map(work, 3, threads=8) == [0, 1, 4]

    def fail(i: int) -> int:
        if i == 3:
            raise OSError("boom")
        time.sleep(0.01)
        return i

    seen = []
    with pytest.raises(OSError, match="boom"):
        for value in parallel_imap(fail, 1000, threads=4):
            seen.append(value)
    assert seen == [0, 1, 2]
