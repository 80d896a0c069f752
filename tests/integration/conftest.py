"""A real local Ray for the integration tests, started once per session.

Ray workers inherit the environment of the process that starts Ray, so the AWS variables that
point at the loopback S3 server are set before ``ray.init``: jobs reading ``s3://`` from inside
Ray tasks and actors then resolve the endpoint exactly as they would in production.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_server):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray server binds 127.0.0.1
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        }
    )
    import ray

    # More CPU slots than cores: actor pools hold theirs for the whole job and the read and write
    # tasks need some too; the work itself is small.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory):
    """One finished demo run (sample rollouts, tiny checkpoint, the full job), shared by the tests
    that read a real output table: the report, the notebook and the evaluations."""
    from visualprm_ray.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    manifest = run_demo(workdir, emit=lambda *_: None)
    return workdir, manifest
