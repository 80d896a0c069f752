"""The server's config: the job's sections reused, the token rules, and the RayService entry point."""

from __future__ import annotations

import pytest

from visualprm_ray.job.config import ConfigError, ScoringConfig
from visualprm_ray.serve.app import app_builder, authorized, placement, token_digest
from visualprm_ray.serve.config import TOKEN_ENV, ServeConfig, ServeSetupError, load_token


def test_one_yaml_serves_the_job_and_the_endpoint(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model:\n  source: /models/prm\n  dtype: float32\nscoring:\n  token_budget: 4096\n"
        "  kernels:\n    attention: varlen\nserver:\n  port: 9000\n"
    )
    config = ServeConfig.from_sources(path, ["server.max_queued_requests=7"], server_host="0.0.0.0")
    assert isinstance(config.scoring, ScoringConfig) and config.scoring.kernels.attention == "varlen"
    assert (config.server.host, config.server.port, config.server.max_queued_requests) == ("0.0.0.0", 9000, 7)
    assert ServeConfig.from_sources(None, model_source="/m").server.host == "127.0.0.1"  # loopback by default
    with pytest.raises(ConfigError, match=r"server\.prot"):
        ServeConfig.from_sources(None, ["server.prot=1"], model_source="/m")


def test_the_token_comes_from_a_file_or_the_environment_and_is_never_optional(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = ServeConfig.from_sources(None, model_source="/m")
    with pytest.raises(ServeSetupError, match="a bearer token is required"):
        load_token(config)
    monkeypatch.setenv(TOKEN_ENV, "  from-env \n")
    assert load_token(config) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    with_file = ServeConfig.from_sources(None, [f"server.token_file={tmp_path / 'token'}"], model_source="/m")
    assert load_token(with_file) == "from-file"
    missing = ServeConfig.from_sources(None, [f"server.token_file={tmp_path / 'nope'}"], model_source="/m")
    with pytest.raises(ServeSetupError, match=r"cannot read server\.token_file"):
        load_token(missing)


def test_only_the_exact_bearer_token_is_authorized():
    digest = token_digest("s3cret")
    assert authorized("Bearer s3cret", digest) and authorized("bearer  s3cret ", digest)
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not authorized(header, digest), header
    assert token_digest("") != digest


def test_placement_and_the_rayservice_builder_without_a_cluster(monkeypatch):
    explicit = ServeConfig.from_sources(
        None, ["server.device=cpu", "server.replicas=3", "server.cpus_per_replica=2"], model_source="/m"
    )
    assert placement(explicit) == (3, "cpu", 2)
    gpu = ServeConfig.from_sources(None, ["server.device=cuda", "server.replicas=2"], model_source="/m")
    assert placement(gpu) == (2, "cuda", 1.0)
    with pytest.raises(ValueError, match="unknown app_builder args"):
        app_builder({"model": "/m", "replica": 2})
    monkeypatch.setenv(TOKEN_ENV, "t")
    built = app_builder(
        {"model": "/m", "set": ["server.device=cpu", "server.replicas=2", "server.cpus_per_replica=1"]}
    )
    assert type(built).__name__ == "Application"
