"""The job on a Ray cluster of several nodes (``ray.cluster_utils.Cluster``, in a subprocess: see
``multinode.py``), with the model on the loopback S3 server behind a request-counting proxy.

- a worker node removed without warning mid-run, a fresh one added: the job completes, every
  candidate exactly once, the scores those of the in-process scorer; the progress and journal
  actors (on the driver's node) keep working;
- the model fetched from object storage once per node, whole only where a scorer runs, while
  several actors of a node start at once (the cache lock holds);
- the scorer pool grows when a node joins mid-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from reference import in_process_step_scores

from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("multinode.py")
GROUPS = make_groups(12, candidates=2, seed=21)


@pytest.fixture(scope="module")
def proxy(s3_server):
    from s3_proxy import S3Proxy

    proxy = S3Proxy(s3_server.endpoint_url)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Step scores of every candidate, in process, the plain way."""
    return in_process_step_scores(tiny_model, GROUPS)


def _run(scenario: str, workdir: Path, proxy, bucket: str, overrides: list[str], groups=GROUPS) -> dict:
    write_shards(workdir / "in", groups, 3)
    (workdir / "overrides.json").write_text(json.dumps(overrides))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": proxy.endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "MODEL_URI": f"s3://{bucket}/models/tiny",
        "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / "report.json").read_text())


def _upload(bucket: str, model: Path) -> None:
    import boto3

    client = boto3.client("s3")
    for path in sorted(model.iterdir()):
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")


def _check_output(out: Path, reference) -> None:
    rows = pq.read_table(out).to_pylist()
    keys = [(r["id"], r["candidate_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(reference)  # every candidate exactly once
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["step_scores"] == pytest.approx(reference[(row["id"], row["candidate_index"])], abs=1e-4)


def test_a_lost_node_costs_no_candidate_and_each_node_fetches_the_model_once(
    s3_env, proxy, tiny_model, reference, tmp_path
):
    _upload(s3_env, tiny_model)
    proxy.reset()
    # Four scorers on two nodes of three CPUs: two start together on each node.
    report = _run("node-loss", tmp_path, proxy, s3_env, ["runtime.num_scorers=4"])
    assert report["events"][0].startswith("removed node a") and report["events"][1:] == ["added node c"], (
        report
    )
    assert report["status"] == "complete", report
    counts = report["counts"]
    assert counts["candidates_in"] == counts["scored"] == 24, counts
    assert counts["duplicates"] == counts["missing"] == 0
    _check_output(tmp_path / "out", reference)
    # The progress counter on the driver's node outlived the lost node and kept reporting.
    assert "progress unavailable" not in " ".join(report["log"])
    # Each node holds at most one whole copy and one config-and-tokenizer copy, and the weights
    # were fetched exactly once per node that holds them, however many of its actors started together.
    caches = report["caches"]
    assert all(sorted(copies.values()).count(True) <= 1 and len(copies) <= 2 for copies in caches.values()), (
        caches
    )
    holders = [node for node, copies in caches.items() if any(copies.values())]
    weights = [r for r in proxy.snapshot() if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(weights) == len(holders) >= 2, (len(weights), caches)


def test_the_scorer_pool_grows_when_a_node_joins(s3_env, proxy, tiny_model, tmp_path):
    _upload(s3_env, tiny_model)
    # Enough work left when the node joins: Ray Data sees cluster resources change every 20 s.
    groups = make_groups(96, candidates=2, seed=22)
    report = _run(
        "grow",
        tmp_path,
        proxy,
        s3_env,
        [
            "runtime.num_scorers=1",
            "runtime.max_scorers=2",
            "runtime.num_preparers=1",
            "runtime.cpus_per_preparer=1",
        ],
        groups=groups,
    )
    assert report["events"] and report["events"][0].startswith("added node b"), report
    assert report["status"] == "complete" and report["counts"]["scored"] == 192
    # The pool started with one scorer and grew once the cluster had room for another. (Here the
    # room can also be node a's, once its read tasks are done: the new actor may land on either.)
    assert report["scorers_started"] == 2, report
