"""The driver's bookkeeping at scale: round trips to the object store, and memory per candidate.

(a) ``--part latency``: F input files on the loopback S3 server, each with one committed output
    file (an interrupted run that committed every group), behind a proxy that delays every request
    by D seconds. The job is rerun (resume) at D and at 0 on a local Ray; (time at D - time at 0)
    / D / F is the number of *serial* round trips it pays per input file (requests made many at
    once count once). The serial bound, one round trip after another, is printed beside it.
(b) ``--part memory``: N synthetic text-only candidates (grouped, 8 per group) on local disk with a
    matching output table; the input count and the count check of the driver are timed, and the
    process's peak RSS is sampled, in a fresh process per size.

    python benchmarks/scale_cpu.py --part latency [--files 100] [--delay 0.1]
    python benchmarks/scale_cpu.py --part memory [--candidates 1000000,10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUP = 8  # candidates per group


def _output_rows(ids: list[str]):
    """Output rows in the job's schema for every candidate of ``ids`` (scores made up)."""
    import pyarrow as pa

    from visualprm_ray.schema import output_schema

    n = len(ids) * GROUP
    schema = output_schema([])
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns["id"] = pa.array([i for i in ids for _ in range(GROUP)], pa.string())
    columns["candidate_index"] = pa.array([k for _ in ids for k in range(GROUP)], pa.int32())
    columns["is_best"] = pa.array([k == 0 for _ in ids for k in range(GROUP)])
    return pa.table(columns, schema=schema)


def _input_rows(ids: list[str]):
    import pyarrow as pa

    return pa.table(
        {
            "id": ids,
            "question": [f"What is {i}?" for i in ids],
            "responses": [[f"Step one of {i}.\n\nSo it is {k}." for k in range(GROUP)] for i in ids],
        }
    )


# -- (a) round trips ---------------------------------------------------------------------------------


def latency(args) -> dict:
    import socket

    import boto3
    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
    from s3_proxy import S3Proxy

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = S3Proxy(f"http://127.0.0.1:{port}")
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint_url
    import ray

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.driver import SUCCESS, run_job
    from visualprm_ray.job.resume import check_job_record, job_record
    from visualprm_ray.model.source import model_identity
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket="scale")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model")
        config = JobConfig.from_sources(
            None,
            ["model.dtype=float32", "runtime.progress_interval_s=600"],
            input_uri="s3://scale/in/",
            output_uri="s3://scale/out/",
            model_source=str(model),
        )
        for f in range(args.files):
            ids = [f"f{f:05d}-g{g:03d}" for g in range(args.groups)]
            for prefix, table in (("in", _input_rows(ids)), ("out", _output_rows(ids))):
                path = Path(tmp) / f"{prefix}.parquet"
                pq.write_table(table, path)
                client.upload_file(str(path), "scale", f"{prefix}/part-{f:05d}.parquet")
        identity = model_identity(model)
        check_job_record(config, job_record(config, identity))  # the interrupted run's record
        for delay in (0.0, args.delay, 0.0, args.delay):
            client.delete_object(Bucket="scale", Key=f"out/{SUCCESS}")
            proxy.reset(delay)
            started = time.perf_counter()
            manifest = run_job(config, emit=lambda *_: None)
            seconds = time.perf_counter() - started
            requests = proxy.snapshot()
            assert manifest["counts"]["skipped"] == args.files * args.groups * GROUP, manifest["counts"]
            results.setdefault(delay, []).append((seconds, len(requests)))
    ray.shutdown()
    proxy.close()
    server.stop()
    base = min(s for s, _ in results[0.0])
    slow = min(s for s, _ in results[args.delay])
    trips = (slow - base) / args.delay / args.files
    requests = results[args.delay][0][1]
    return {
        "part": "latency",
        "files": args.files,
        "groups_per_file": args.groups,
        "delay_s": args.delay,
        "job_s_at_0": round(base, 2),
        "job_s_at_delay": round(slow, 2),
        "requests": requests,
        "serial_round_trips_per_file": round(trips, 3),
        "serial_bound_per_file": round(requests / args.files, 2),
    }


# -- (b) memory --------------------------------------------------------------------------------------


def _write_tables(root: Path, candidates: int, files: int) -> None:
    import pyarrow.parquet as pq

    groups = candidates // GROUP
    per_file = -(-groups // files)
    (root / "in").mkdir(parents=True)
    (root / "out").mkdir()
    for f in range(files):
        ids = [f"g{g:09d}" for g in range(f * per_file, min(groups, (f + 1) * per_file))]
        pq.write_table(_input_rows(ids), root / "in" / f"part-{f:05d}.parquet", row_group_size=10_000)
        pq.write_table(_output_rows(ids), root / "out" / f"part-{f:05d}.parquet", row_group_size=100_000)


def memory_child(candidates: int, root: Path) -> dict:
    """In a fresh process: the driver's input count and count check over tables on local disk."""
    import psutil

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.counts import count_input, count_output
    from visualprm_ray.job.inputs import plan_read
    from visualprm_ray.job.resume import Committed

    me = psutil.Process()
    peak = {"rss": me.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak["rss"] = max(peak["rss"], me.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    baseline = me.memory_info().rss
    config = JobConfig.from_sources(
        None, [], input_uri=str(root / "in"), output_uri=str(root / "out"), model_source=str(root)
    )
    started = time.perf_counter()
    plan = plan_read(config)
    counts, ids = count_input(config, plan)
    del ids
    counted = time.perf_counter() - started
    started = time.perf_counter()
    counts = count_output(config, counts, Committed())
    checked = time.perf_counter() - started
    stop.set()
    assert counts.problems() == [], counts.problems()
    assert counts.candidates_in == counts.scored == candidates
    return {
        "candidates": candidates,
        "files": len(plan.files),
        "input_count_s": round(counted, 2),
        "count_check_s": round(checked, 2),
        "peak_rss_mib": round(peak["rss"] / 2**20),
        "rss_before_mib": round(baseline / 2**20),
    }


def memory(args) -> list[dict]:
    out = []
    for n in (int(x) for x in args.candidates.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            files = max(1, n // 100_000)  # 100k candidates (12.5k groups) per file
            _write_tables(Path(tmp), n, files)
            child = subprocess.run(
                [sys.executable, __file__, "--part", "memory-child", "--root", tmp, "--candidates", str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            out.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["latency", "memory", "memory-child"], required=True)
    parser.add_argument("--files", type=int, default=100, help="latency: input files (one output file each)")
    parser.add_argument("--groups", type=int, default=4, help="latency: groups per input file")
    parser.add_argument("--delay", type=float, default=0.1, help="latency: seconds added to every request")
    parser.add_argument("--candidates", default="1000000,10000000", help="memory: sizes, comma-separated")
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    if args.part == "memory-child":
        print(json.dumps(memory_child(int(args.candidates), args.root)))
        return
    report = latency(args) if args.part == "latency" else memory(args)
    print(json.dumps({"machine": machine, "results": report}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": report}, indent=2))


if __name__ == "__main__":
    main()
