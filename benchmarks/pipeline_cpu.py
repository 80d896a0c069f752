"""The Ray job vs the in-process scorer on the same data (tiny checkpoint, CPU).

Both sides start from the same Parquet shards and include their own start-up: the in-process side
loads the model and reads/decodes the rows itself; the job side is `run_job` on an already started
local Ray (Ray's own start-up is printed separately). Usage:
python benchmarks/pipeline_cpu.py [--groups 48] [--candidates 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument(
        "--set", action="append", default=[], help="job config override, e.g. runtime.num_scorers=1"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import pyarrow.parquet as pq
    import ray

    from visualprm_ray.checkpoint import write_tiny_checkpoint
    from visualprm_ray.config import JobConfig
    from visualprm_ray.pipeline import run_job
    from visualprm_ray.sample_data import make_groups, write_shards
    from visualprm_ray.scorer import VisualPRM

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "in", make_groups(args.groups, args.candidates, seed=0), args.shards)
        model = write_tiny_checkpoint(root / "model")
        rows = args.groups * args.candidates

        start = time.perf_counter()
        prm = VisualPRM.from_pretrained(model, device="cpu", dtype="float32")
        for shard in sorted((root / "in").glob("*.parquet")):
            for row in pq.read_table(shard).to_pylist():
                prm.score(row["question"], row["responses"], row["image"])
        in_process = time.perf_counter() - start

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
            output_uri=str(root / "out"),
            model_source=str(model),
        )
        start = time.perf_counter()
        manifest = run_job(config, emit=lambda line: None)
        job = time.perf_counter() - start
        ray.shutdown()
    assert manifest["counts"]["scored"] == rows
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
        "in_process_rows_per_s": rows / in_process,
        "job_rows_per_s": rows / job,
        "ratio": in_process / job,
        "ray_init_s": ray_start,
        "job_first_result_s": manifest["timings"]["first_result_s"],
        "job_steady_rows_per_s": manifest["timings"]["steady_rows_per_s"],
        "job_stage_busy_s": manifest["timings"]["stage_busy_s"],
    }
    print(f"Ray job vs in-process scorer, tiny checkpoint, CPU float32, {result['machine']}")
    print(f"{'path':<12} {'rows':>5} {'seconds':>8} {'rows/s':>7}")
    print(f"{'in-process':<12} {rows:>5} {in_process:>8.1f} {rows / in_process:>7.2f}")
    print(
        f"{'ray job':<12} {rows:>5} {job:>8.1f} {rows / job:>7.2f}   (ray.init {ray_start:.1f}s not included)"
    )
    print(f"job / in-process throughput: {result['ratio']:.2f}")
    steady = result["job_steady_rows_per_s"]
    print(
        f"job start-up to first scored batch: {result['job_first_result_s']:.1f}s; steady state "
        f"{steady:.2f} rows/s = {steady * in_process / rows:.2f} of in-process"
    )
    busy = result["job_stage_busy_s"]
    print(
        f"busy time by stage (summed over actors): prepare {busy['prepare']:.1f}s, score {busy['score']:.1f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
