"""`ray job submit` for real: a local head on 127.0.0.1, the job entry point, idempotent resubmits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """`ray start --head --block` in its own process group, ended by that group's id."""
    # Ray 2.60 heads require a token; clients (this process, the submit script) find it with this mode.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    head = subprocess.Popen(
        [
            str(Path(bindir) / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--num-cpus=4",
            "--disable-usage-stats",
            # The session's other local Ray (the ray_local fixture) holds the default agent ports:
            # without ports of its own this head's job agent never comes up.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),  # noqa: SIM115 - lives as long as the head
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception as exc:
                if time.monotonic() > deadline or head.poll() is not None:
                    log = (tmp_path / "head.log").read_text()[-2000:]
                    raise RuntimeError(f"Ray head did not come up: {log}") from exc
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def test_submit_runs_the_job_and_resubmit_is_idempotent(ray_head, tiny_model, tmp_path):
    address, env = ray_head
    write_shards(tmp_path / "in", make_groups(6, candidates=3, seed=4), 2)
    submit = [
        sys.executable,
        str(ROOT / "jobs" / "submit.py"),
        "--address",
        address,
        "--name",
        "test",
        "--date",
        "2026-11-28",
        "--runtime-env",
        str(ROOT / "cluster" / "runtime_env.yaml"),
        "--timeout",
        "600",
        "--",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model),
        "--set",
        "model.dtype=float32",
        "--set",
        "runtime.cpus_per_preparer=0.5",
    ]
    start = time.monotonic()
    first = subprocess.run(submit, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    elapsed = time.monotonic() - start
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted visualprm-test-2026-11-28" in first.stdout
    frame = pd.read_parquet(tmp_path / "out")
    assert len(frame) == 18 and frame["error"].isna().all()
    assert (tmp_path / "out" / "_SUCCESS").exists()
    print(f"ray job submit round trip: {elapsed:.1f}s")

    again = subprocess.run(submit, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already exists" in again.stdout and "submitted" not in again.stdout

    from ray.job_submission import JobSubmissionClient

    ids = [j.submission_id for j in JobSubmissionClient(address).list_jobs()]
    assert ids.count("visualprm-test-2026-11-28") == 1 and len(ids) == 1
