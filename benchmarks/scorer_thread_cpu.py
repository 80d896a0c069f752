"""The score stage with torch on one thread vs on two threads of the process (CPU, tiny model).

Ray Data runs a map actor's ``__call__`` on a worker thread, not on the thread that ran
``__init__``. Once torch has run on two threads of a process (likely cause: the OpenMP runtime
keeps a team of workers per calling thread), scoring on a 2-core machine ran 20-45% slower, with
1.35-1.6 of 2 cores busy; plain matmul / elementwise / SDPA loops do not show it. ``ScoreStage`` therefore runs its model
load and every batch on one thread of its own. This script measures, without Ray and with the
checkpoint written in a subprocess (so the process starts with no torch work, like an actor):
the stage called from the main thread and from a worker thread (both should be alike), then the
same after one small torch op on the main thread, i.e. torch on two threads (the old layout).
Usage: python benchmarks/scorer_thread_cpu.py [--groups 32] [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per thread placement")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.inputs import plan_read
    from visualprm_ray.job.stages.prepare import PrepareStage
    from visualprm_ray.job.stages.read import Rename
    from visualprm_ray.job.stages.score import ScoreStage
    from visualprm_ray.sample_data import make_groups, write_shards

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "in", make_groups(args.groups, args.candidates, seed=0), 1)
        model = root / "model"
        # In a subprocess: writing random weights runs torch, which would put a torch thread team
        # on this process's main thread before the measurement starts.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint; "
                "write_tiny_checkpoint(sys.argv[1])",
                str(model),
            ],
            check=True,
        )
        config = JobConfig.from_sources(
            None,
            ["model.dtype=float32"],
            input_uri=str(root / "in"),
            output_uri=str(root / "out"),
            model_source=str(model),
        )
        plan = plan_read(config)
        table = pa.concat_tables(
            [Rename(config, plan)(pq.read_table(f.path).select(plan.columns)) for f in plan.files]
        )
        batch = config.runtime.groups_per_batch
        prepare = PrepareStage(config, str(model))  # no torch: tiling and tokenizing only
        prepared = [prepare(table.slice(i, batch)) for i in range(0, len(table), batch)]
        stage = ScoreStage(config, str(model), "cpu")

        def score_all() -> None:
            for item in prepared:
                stage(item)

        worker = ThreadPoolExecutor(max_workers=1)
        score_all()  # warm-up
        rows = []

        def measure(label: str, caller: str) -> None:
            for _ in range(args.repeats):
                if caller == "main":
                    wall, cpu = _timed(score_all)
                else:
                    wall, cpu = _timed(lambda: worker.submit(score_all).result())
                rows.append({"case": label, "wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall})

        measure("called from main thread", "main")
        measure("called from worker thread", "worker")
        import torch

        torch.ones(512, 512).sum(dim=0)  # torch on the main thread too: a second thread team
        measure("+ torch on main thread", "worker")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"ScoreStage over {args.groups} groups x {args.candidates} candidates, tiny checkpoint, {machine}")
    print(f"{'case':<26} {'wall s':>7} {'cpu s':>7} {'cores busy':>10}")
    for r in rows:
        print(f"{r['case']:<26} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} {r['cores_busy']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2))


def _timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds of the whole process (all threads) for one call."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu


if __name__ == "__main__":
    main()
