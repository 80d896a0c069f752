"""Scenarios on a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``).

Run as a script by ``test_multinode.py``, in a process of its own: a Cluster and the session's
local Ray cannot share one process. Every node gets its own model cache (``VISUALPRM_CACHE``),
as nodes of a real cluster have their own disks; the head node, where the driver runs, has no
CPUs, so every task and actor runs on the worker nodes the scenario removes and adds.

    python multinode.py SCENARIO WORKDIR   # writes WORKDIR/report.json: what happened

Scenarios:
- ``node-loss``: a worker node is removed without warning once the first groups are scored, and a
  fresh node is added; the job must complete.
- ``grow``: the job starts on one worker node with room for one scorer (``runtime.max_scorers`` 2);
  a second node joins mid-run and must get a scorer of its own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _node_env(workdir: Path, name: str) -> dict[str, str]:
    return {"VISUALPRM_CACHE": str(workdir / "caches" / name)}


def main(scenario: str, workdir: Path) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.driver import run_job

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "env_vars": _node_env(workdir, "head")},
    )
    # "grow": node a has room for one scorer, one preparer and one read task (3 CPUs of one each,
    # the scenario's overrides): a second scorer can only start on the node that joins.
    first = 3
    nodes = {"a": cluster.add_node(num_cpus=first, env_vars=_node_env(workdir, "a"))}
    if scenario == "node-loss":
        nodes["b"] = cluster.add_node(num_cpus=3, env_vars=_node_env(workdir, "b"))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    extra = json.loads((workdir / "overrides.json").read_text())
    if scenario == "grow":
        # A slow device: the scorers are the bottleneck, so work queues up for a second one.
        from visualprm_ray.job.faults import ENV

        os.environ[ENV] = json.dumps({"score_delay_s": 0.5})
    config = JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            "runtime.cpus_per_preparer=0.5",
            "runtime.progress_interval_s=1",
            "runtime.groups_per_batch=2",
            "output.min_rows_per_file=4",
            *extra,
        ],
        input_uri=str(workdir / "in"),
        output_uri=str(workdir / "out"),
        model_source=os.environ["MODEL_URI"],
    )
    events: list[str] = []
    lines: list[str] = []
    done = threading.Event()

    def scored() -> int:
        for line in reversed(lines):
            if "progress done=" in line:
                return int(line.split("scored=")[1].split()[0])
        return 0

    def disrupt() -> None:
        while not done.is_set() and scored() < (4 if scenario == "node-loss" else 2):
            time.sleep(0.2)
        if done.is_set():
            events.append("the job ended before the node change")
            return
        if scenario == "node-loss":
            cluster.remove_node(nodes.pop("a"), allow_graceful=False)
            events.append(f"removed node a after {scored()} scored")
            nodes["c"] = cluster.add_node(num_cpus=3, env_vars=_node_env(workdir, "c"))
            events.append("added node c")
        else:
            nodes["b"] = cluster.add_node(num_cpus=3, env_vars=_node_env(workdir, "b"))
            events.append(f"added node b after {scored()} scored")

    # Nodes are added from the main thread (Ray's node start-up installs signal handlers): the job
    # runs in a thread of its own meanwhile.
    result: dict = {}

    def job() -> None:
        try:
            result["manifest"] = run_job(config, emit=lines.append)
        except BaseException as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            done.set()

    started = time.time()
    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    disrupt()
    runner.join(600)
    if "manifest" not in result:
        raise SystemExit(f"the job failed: {result.get('error', 'it did not finish in time')}; {events}")
    manifest = result["manifest"]
    report = {
        "events": events,
        "seconds": time.time() - started,
        "counts": manifest["counts"],
        "status": manifest["status"],
        "scorer_nodes": manifest["resources"].get("scorer_nodes"),
        "scorers_started": manifest["resources"].get("scorers_started"),
        "attempts": manifest.get("attempts"),
        # Per node: each copy of the model in its cache, and whether the copy holds the weights.
        "caches": {
            name: {
                p.name: bool(list(p.glob("*.safetensors")))
                for p in (workdir / "caches" / name).glob("*")
                if p.is_dir() and not p.name.startswith(".")
            }
            for name in ("head", "a", "b", "c")
            if (workdir / "caches" / name).exists()
        },
        "log": lines[-5:],
    }
    # A file, not stdout: Ray prints its own lines there (a task retried off a lost node) at any time.
    (workdir / "report.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
