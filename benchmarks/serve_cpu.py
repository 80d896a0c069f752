"""The scoring endpoint under load vs in-process VisualPRM.score on the same requests (tiny checkpoint, CPU).

First, in-process: ``VisualPRM.score`` on each request in turn (decoding its image as the server
does), with as many torch threads as the server's replica gets. Then Ray Serve on a local Ray, one
replica: at each concurrency C, C clients (threads, HTTP on loopback, the package's client) share
the same K requests; throughput in candidates/s and the p50/p95/p99 latency per request, and the
served scores checked against the in-process ones. Bounded in count (K per level) and in time
(--time-limit for the whole served part). Usage:
python benchmarks/serve_cpu.py [--requests 48] [--concurrency 1,2,4,8] [--candidates 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _timed(client, group: dict) -> tuple[list[dict], float]:
    start = time.perf_counter()
    answer = client.score(group["question"], group["responses"], group["image"])
    return answer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level (K)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts to measure (C)")
    parser.add_argument("--candidates", type=int, default=4, help="responses per request")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="torch threads on both sides")
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="seconds for the served levels in all"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    token = "bench-" + base64.b16encode(os.urandom(8)).decode()
    os.environ["VISUALPRM_SERVE_TOKEN"] = token
    import torch
    from PIL import Image

    from visualprm_ray.client import PRMClient
    from visualprm_ray.model.prm import VisualPRM
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint
    from visualprm_ray.sample_data import make_groups

    groups = make_groups(args.requests, args.candidates, seed=7)
    candidates = sum(len(g["responses"]) for g in groups)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model")

        # -- in-process ------------------------------------------------------------------------------
        torch.set_num_threads(args.cpus)
        prm = VisualPRM.from_pretrained(model, device="cpu", dtype="float32")
        prm.score(groups[0]["question"], groups[0]["responses"], groups[0]["image"])  # warm-up
        start = time.perf_counter()
        reference = [
            prm.score(g["question"], g["responses"], Image.open(io.BytesIO(g["image"]))) for g in groups
        ]
        in_process_s = time.perf_counter() - start
        in_process_rate = candidates / in_process_s
        print(f"in-process: {len(groups)} requests, {candidates} candidates in {in_process_s:.1f} s: "
              f"{in_process_rate:.1f} candidates/s")  # fmt: skip

        # -- served ----------------------------------------------------------------------------------
        import ray
        from ray import serve

        from visualprm_ray.serve.config import ServeConfig
        from visualprm_ray.serve.driver import start as start_server

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # One replica holding the cores the in-process side had; a CPU more for Serve's own actors.
        ray.init(num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False)
        config = ServeConfig.from_sources(
            None,
            [
                "model.dtype=float32",
                f"server.port={port}",
                "server.replicas=1",
                f"server.cpus_per_replica={args.cpus}",
            ],
            model_source=str(model),
        )
        url = start_server(config)
        client = PRMClient(url, token=token, retries=20)
        client.score(groups[0]["question"], groups[0]["responses"], groups[0]["image"])  # warm-up
        levels, worst_diff = [], 0.0
        deadline = time.monotonic() + args.time_limit
        for concurrency in [int(c) for c in args.concurrency.split(",") if c.strip()]:
            if time.monotonic() > deadline:
                print(f"concurrency {concurrency}: skipped, past --time-limit")
                continue
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                timed = list(pool.map(lambda g: _timed(client, g), groups))
            elapsed = time.perf_counter() - start
            answers, latencies = [a for a, _ in timed], [t for _, t in timed]
            for answer, ref in zip(answers, reference, strict=True):
                for got, want in zip(answer, ref, strict=True):
                    worst_diff = max(
                        worst_diff, float(np.abs(np.subtract(got["step_scores"], want.step_scores)).max())
                    )
            rate = candidates / elapsed
            levels.append(
                {
                    "concurrency": concurrency,
                    "seconds": elapsed,
                    "candidates_per_s": rate,
                    "ratio_vs_in_process": rate / in_process_rate,
                    "p50_s": _percentile(latencies, 50),
                    "p95_s": _percentile(latencies, 95),
                    "p99_s": _percentile(latencies, 99),
                }
            )
        stats = serve.get_app_handle("visualprm").stats.remote().result()
        serve.shutdown()
        ray.shutdown()

    print(f"\nserved vs in-process VisualPRM.score, tiny checkpoint, CPU float32, {machine}")
    print(
        f"{len(groups)} requests x {args.candidates} candidates per level; 1 replica x {args.cpus} torch threads"
    )
    print(f"{'clients':>7} {'cand/s':>8} {'vs in-process':>13} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7}")
    for level in levels:
        print(
            f"{level['concurrency']:>7} {level['candidates_per_s']:>8.1f} {level['ratio_vs_in_process']:>13.2f} "
            f"{level['p50_s']:>7.3f} {level['p95_s']:>7.3f} {level['p99_s']:>7.3f}"
        )
    best = max(levels, key=lambda level: level["candidates_per_s"])
    sizes = stats["batches"]
    print(f"at saturation ({best['concurrency']} clients): {best['ratio_vs_in_process']:.2f} of in-process")
    print(
        f"scorer batches (requests each): mean {statistics.mean(sizes):.2f}, max {max(sizes)} over {len(sizes)}"
    )
    print(f"max |served - in-process| step score: {worst_diff:.2e}")
    busy = stats["busy_s"]
    print(f"replica busy: preparing {busy['prepare']:.1f} s, scoring {busy['score']:.1f} s (all levels)")
    if args.json:
        report = {
            "machine": machine,
            "date": time.strftime("%Y-%m-%d"),
            "requests": len(groups),
            "candidates": candidates,
            "in_process_candidates_per_s": in_process_rate,
            "levels": levels,
            "saturation_ratio": best["ratio_vs_in_process"],
            "batch_sizes": sizes,
            "replica_busy_s": stats["busy_s"],
            "max_diff": worst_diff,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
