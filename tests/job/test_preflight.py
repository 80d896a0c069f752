"""The checks before Ray starts: what a storage exception means, and which paths look local."""

from __future__ import annotations

import pytest

from visualprm_ray.job.preflight import _looks_local, _near, storage_problem
from visualprm_ray.storage import StorageError


def test_storage_problems_in_words():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert "no credentials for s3://b/k" in storage_problem(NoCredentialsError(), "s3://b/k")
    wrapped = RuntimeError("listing failed")
    wrapped.__cause__ = NoCredentialsError()
    assert "AWS_ACCESS_KEY_ID" in storage_problem(wrapped, "s3://b/k")  # found behind a wrapper
    assert "access denied to s3://b/k" in storage_problem(PermissionError("AccessDenied"), "s3://b/k")
    reach = storage_problem(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "s3://b/k")
    assert "cannot reach the object store" in reach and "storage.endpoint_url" in reach
    assert "cannot reach" in storage_problem(StorageError("failed after 6 attempt(s)"), "s3://b/k")
    assert storage_problem(ValueError("a bug of ours"), "s3://b/k") is None  # unknown: not explained away


@pytest.mark.parametrize(
    ("source", "local"),
    [
        ("/abs/model", True),
        ("./model", True),
        ("model", True),
        ("OpenGVLab/VisualPRM-8B", False),
    ],
)
def test_which_sources_look_like_paths(source, local):
    assert _looks_local(source) is local


def test_a_relative_path_whose_first_directory_exists_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert _looks_local("models/tiny-prn")
    (tmp_path / "models" / "tiny-prm").mkdir()
    assert "did you mean" in _near("models/tiny-prn") and "tiny-prm" in _near("models/tiny-prn")
    assert "does not exist" in _near("nowhere/at/all")


def test_an_output_in_a_missing_bucket_is_refused_not_created(s3_env, monkeypatch):
    import boto3

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.preflight import SetupError, check_output

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = JobConfig.from_sources(
        None, [], input_uri="/in", output_uri="s3://no-such-bucket-here/scores/", model_source="/m"
    )
    with pytest.raises(SetupError, match="output: cannot write to s3://no-such-bucket-here/scores/"):
        check_output(config)
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in names
    ok = JobConfig.from_sources(
        None, [], input_uri="/in", output_uri=f"s3://{s3_env}/scores/", model_source="/m"
    )
    check_output(ok)  # writable: the probe goes and nothing stays
    assert boto3.client("s3").list_objects_v2(Bucket=s3_env).get("KeyCount", 0) == 0
