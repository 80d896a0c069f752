"""The flat layout's regroup pass at scale: N flat rows -> group rows, on a local Ray (CPU).

Synthetic flat rollouts (one row per candidate, every row carrying its group's image bytes, as flat
dumps do) are generated in seconds, then regrouped exactly as a job does it
(``visualprm_ray.job.flat.regrouped_plan``: light columns shuffled by id, images joined back from
the input files after). Prints the wall time, the driver's peak RSS and the peak RSS summed over
every process of the machine's Ray (PSS, driver included), sampled every second, and checks that every
row came back in exactly one group. Usage:
python benchmarks/regroup_cpu.py [--rows 1000000] [--candidates 8] [--files 8] [--image-bytes 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path


def _write_input(root: Path, rows: int, candidates: int, files: int, image_bytes: int = 0) -> int:
    """Flat rows of ``rows // candidates`` groups, a group's rows adjacent, groups spread over files.

    Images are small PNGs, or with ``image_bytes`` that many random bytes per group (the regroup
    pass never decodes them: only their size matters here)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    groups = rows // candidates
    root.mkdir(parents=True)
    # One small distinct PNG per group (a real image would be larger: the shuffle does not carry it).
    palette = []
    for g in range(256):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (g, 255 - g, 7)).save(buffer, format="PNG")
        palette.append(buffer.getvalue())
    rng = np.random.default_rng(0)
    per_file = -(-groups // files)
    for f in range(files):
        ids = np.arange(f * per_file, min(groups, (f + 1) * per_file))
        if not len(ids):
            continue
        group_of_row = np.repeat(ids, candidates)
        steps = rng.integers(2, 6, size=len(group_of_row))
        if image_bytes:
            blobs = [rng.bytes(image_bytes) for _ in ids]
            images = [blobs[g - ids[0]] for g in group_of_row]
        else:
            images = [palette[g % 256] for g in group_of_row]
        table = pa.table(
            {
                "id": pa.array([f"g{g:09d}" for g in group_of_row]),
                "question": pa.array([f"What is the area of figure {g}?" for g in group_of_row]),
                "image": pa.array(images, pa.binary()),
                "response": pa.array(
                    [
                        "\n\n".join(f"Step {s}: the side is {g % 97} cm." for s in range(n))
                        for g, n in zip(group_of_row, steps, strict=True)
                    ]
                ),
                "policy": pa.array([f"policy-{g % 3}" for g in group_of_row]),
            }
        )
        pq.write_table(
            table, root / f"part-{f:05d}.parquet", row_group_size=50_000 if not image_bytes else 2_000
        )
    return groups


def _sample_memory(stop: threading.Event, peak: dict[str, float]) -> None:
    """Peak PSS (shared pages split between their users: the object store's memory counts once)
    summed over this process and every Ray process, once a second."""
    import psutil

    me = psutil.Process()
    while not stop.wait(1.0):
        total = 0
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid == me.pid or "ray" in cmd or "raylet" in (p.info["name"] or ""):
                    pss = p.memory_full_info().pss
                    total += pss
                    if p.pid == me.pid:
                        peak["driver_pss"] = max(peak.get("driver_pss", 0), pss)
            except (psutil.Error, TypeError, AttributeError):
                continue
        peak["ray_pss"] = max(peak.get("ray_pss", 0), total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="flat rows (candidates) in all")
    parser.add_argument("--candidates", type=int, default=8, help="rows per group")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument(
        "--image-bytes", type=int, default=0, help="random bytes per image instead of a small PNG (0)"
    )
    parser.add_argument("--cpus", type=int, default=4, help="CPUs the local Ray declares")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import pyarrow.parquet as pq
    import ray

    from visualprm_ray.job import flat
    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.inputs import plan_read

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        # In a child process, so that the driver's peak RSS below is the regroup's alone.
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool:
            groups = pool.apply(
                _write_input, (root / "in", args.rows, args.candidates, args.files, args.image_bytes)
            )
        generated = time.perf_counter() - started
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        config = JobConfig.from_sources(
            None, [], input_uri=str(root / "in"), output_uri=str(root / "out"), model_source=str(root)
        )
        plan = plan_read(config)
        peak: dict[str, float] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_memory, args=(stop, peak), daemon=True)
        sampler.start()
        started = time.perf_counter()
        _, counted = flat.regrouped_plan(config, plan, emit=lambda *_: None)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        table = pq.read_table(
            root / "out" / flat.REGROUPED, columns=["_vp_id", "_vp_candidate_index", "_vp_image"]
        )
        lengths = [len(x) for x in table["_vp_candidate_index"].to_pylist()]
        ok = (
            counted == groups
            and len(set(table["_vp_id"].to_pylist())) == groups
            and sum(lengths) == args.rows
        )
        ok = ok and table["_vp_image"].null_count == 0
        partitions = flat.num_partitions(plan, "image", args.cpus)
        ray.shutdown()
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.cpus} Ray CPUs",
        "rows": args.rows,
        "groups": groups,
        "files": args.files,
        "image_bytes": args.image_bytes or "small PNG",
        "partitions": partitions,
        "generate_s": round(generated, 1),
        "regroup_s": round(seconds, 1),
        "rows_per_s": round(args.rows / seconds),
        "driver_peak_rss_mib": round(driver_peak / 2**20),
        # RSS counts the object store's shared pages the driver maps; PSS splits them among their users.
        "driver_peak_pss_mib": round(peak.get("driver_pss", 0) / 2**20),
        "ray_peak_pss_mib": round(peak.get("ray_pss", 0) / 2**20),
        "every_row_in_one_group": ok,
    }
    print(
        f"regroup of {args.rows} flat rows ({groups} groups, {args.files} files, {partitions} partition(s)) "
        f"on {report['machine']}: {seconds:.1f} s ({report['rows_per_s']} rows/s); driver peak RSS "
        f"{report['driver_peak_rss_mib']} MiB ({report['driver_peak_pss_mib']} MiB PSS), Ray's processes together {report['ray_peak_pss_mib']} MiB PSS at peak; "
        f"every row in exactly one group: {ok}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not ok:
        raise SystemExit("the regrouped rows do not match the input")


if __name__ == "__main__":
    main()
