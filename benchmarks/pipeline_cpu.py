"""The Ray job vs the in-process scorer on the same data (tiny checkpoint, CPU).

Both sides start from the same Parquet shards and include their own start-up: the in-process side
loads the model and reads/decodes the rows itself; the job side is `run_job` on an already started
local Ray (Ray's own start-up is printed separately). Usage:
python benchmarks/pipeline_cpu.py [--groups 384] [--candidates 4] [--repeats 1] [--json FILE]

"ratio" is end to end (start-up included); "steady ratio" compares the job's rate between its
first and last scored batch with the in-process end-to-end rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=384, help="groups (rows = groups x candidates)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="in-process/job pairs, each job on a fresh Ray; median reported",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="job config override, e.g. runtime.num_scorers=1"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint
    from visualprm_ray.sample_data import make_groups, write_shards

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "in", make_groups(args.groups, args.candidates, seed=0), args.shards)
        model = write_tiny_checkpoint(root / "model")
        for repeat in range(args.repeats):
            runs.append(_pair(root, model, args, repeat))
    rows = args.groups * args.candidates
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"Ray job vs in-process scorer, tiny checkpoint, CPU float32, {machine}, {rows} rows")
    print(
        f"{'run':>3} {'in-process s':>12} {'job s':>7} {'ratio':>6} {'ray.init s':>10} "
        f"{'job first batch s':>17} {'job steady rows/s':>17} {'steady ratio':>12}"
    )
    for i, r in enumerate(runs):
        print(
            f"{i:>3} {r['in_process_s']:>12.1f} {r['job_s']:>7.1f} {r['ratio']:>6.2f} {r['ray_init_s']:>10.1f} "
            f"{r['job_first_result_s']:>17.1f} {r['job_steady_rows_per_s']:>17.2f} {r['steady_ratio']:>12.2f}"
        )
    ratio = statistics.median(r["ratio"] for r in runs)
    print(f"job / in-process throughput (median of {len(runs)}): {ratio:.2f}")
    layout = runs[-1]["resources"]
    print(
        f"job layout: {layout['num_scorers']} scorer(s) x {layout['cpu_threads_per_scorer']} torch thread(s), "
        f"{layout['num_preparers']} preparer(s)"
    )
    busy = runs[-1]["job_stage_busy_s"]
    print(
        f"busy time by stage, last run (summed over actors): prepare {busy['prepare']:.1f}s, "
        f"score {busy['score']:.1f}s"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "rows": rows, "median_ratio": ratio, "runs": runs}, indent=2)
        )


def _pair(root: Path, model: Path, args: argparse.Namespace, repeat: int) -> dict:
    """One in-process pass and one job on a freshly started local Ray, over the same shards."""
    import pyarrow.parquet as pq
    import ray

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.driver import run_job
    from visualprm_ray.model.prm import VisualPRM

    rows = args.groups * args.candidates
    start = time.perf_counter()
    prm = VisualPRM.from_pretrained(model, device="cpu", dtype="float32")
    for shard in sorted((root / "in").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            prm.score(row["question"], row["responses"], row["image"])
    in_process = time.perf_counter() - start
    del prm

    start = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    config = JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            "runtime.cpus_per_preparer=0.5",
            "runtime.progress_interval_s=3600",
            *args.set,
        ],
        input_uri=str(root / "in"),
        output_uri=str(root / f"out-{repeat}"),
        model_source=str(model),
    )
    start = time.perf_counter()
    manifest = run_job(config, emit=lambda line: None)
    job = time.perf_counter() - start
    ray.shutdown()
    assert manifest["counts"]["scored"] == rows
    steady = manifest["timings"]["steady_rows_per_s"]
    return {
        "in_process_s": in_process,
        "job_s": job,
        "in_process_rows_per_s": rows / in_process,
        "job_rows_per_s": rows / job,
        "ratio": in_process / job,
        "ray_init_s": ray_start,
        "job_first_result_s": manifest["timings"]["first_result_s"],
        "job_steady_rows_per_s": steady,
        "steady_ratio": steady * in_process / rows,
        "job_stage_busy_s": manifest["timings"]["stage_busy_s"],
        "resources": manifest["resources"],
    }


if __name__ == "__main__":
    main()
