"""``visualprm-ray export`` at scale on a local Ray (CPU): N groups of C candidates -> dpo / sft / prm.

A grouped input (small distinct PNGs, one per group) and a scores output for it are synthesized in
seconds (random step scores, ranks and is_best as the job computes them, a manifest recording the
input's fingerprint), so the export itself is what is timed: the light columns shuffled by id, the
selection, the images read back from the input after the sort, the Parquet write. Prints the wall
time per format, rows/s, the driver's peak RSS, and checks the row counts. Usage:
python benchmarks/export_cpu.py [--groups 100000] [--candidates 4] [--files 8] [--formats dpo,sft,prm] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def _write(root: Path, groups: int, candidates: int, files: int) -> None:
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.driver import MANIFEST, SUCCESS, input_fingerprint
    from visualprm_ray.storage import list_files

    rng = np.random.default_rng(0)
    palette = []
    for g in range(256):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (g, 255 - g, 7)).save(buffer, format="PNG")
        palette.append(buffer.getvalue())
    (root / "in").mkdir(parents=True)
    (root / "scores").mkdir()
    per_file = -(-groups // files)
    for f in range(files):
        ids = np.arange(f * per_file, min(groups, (f + 1) * per_file))
        if not len(ids):
            continue
        names = [f"g{g:09d}" for g in ids]
        steps = rng.integers(2, 6, size=(len(ids), candidates))
        responses = [
            [
                "\n\n".join(f"step {s} of candidate {c} of {n}" for s in range(steps[i, c]))
                for c in range(candidates)
            ]
            for i, n in enumerate(names)
        ]
        pq.write_table(
            pa.table(
                {
                    "id": names,
                    "question": [f"What is shown in figure {n}?" for n in names],
                    "image": pa.array([palette[g % 256] for g in ids], pa.binary()),
                    "responses": responses,
                }
            ),
            root / "in" / f"part-{f:05d}.parquet",
            row_group_size=4096,
        )
        step_scores = [
            [rng.random(int(steps[i, c])).astype("float32") for c in range(candidates)]
            for i in range(len(ids))
        ]
        score = np.array([[s.mean() for s in row] for row in step_scores], dtype="float32")
        rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1).astype("int32")
        pq.write_table(
            pa.table(
                {
                    "id": np.repeat(names, candidates),
                    "candidate_index": np.tile(np.arange(candidates, dtype="int32"), len(ids)),
                    "step_scores": pa.array(
                        [s.tolist() for row in step_scores for s in row], pa.list_(pa.float32())
                    ),
                    "score": score.ravel(),
                    "rank": rank.ravel(),
                    "is_best": (rank == 0).ravel(),
                    "error": pa.nulls(len(ids) * candidates, pa.string()),
                }
            ),
            root / "scores" / f"part-{f:05d}.parquet",
        )
    config = JobConfig.from_sources(
        None, [], input_uri=str(root / "in"), output_uri=str(root / "scores"), model_source="synthetic"
    )
    listing = list_files(str(root / "in"), detail=True)
    manifest = {
        "status": "complete",
        "config": config.redacted_dict(),
        "model": {"source": "synthetic", "identity": "none"},
        "input": {"fingerprint": input_fingerprint(listing)},
    }
    (root / "scores" / MANIFEST).write_text(json.dumps(manifest))
    (root / "scores" / SUCCESS).write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--formats", default="dpo,sft,prm")
    parser.add_argument("--cpus", type=int, default=4, help="CPUs declared to the local Ray")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from visualprm_ray.export import ExportConfig, run_export

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        _write(root, args.groups, args.candidates, args.files)
        print(
            f"synthesized {args.groups} groups x {args.candidates} candidates in {time.perf_counter() - t0:.1f}s"
        )
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        results = []
        for fmt in args.formats.split(","):
            config = ExportConfig.from_sources(
                None,
                [],
                scores_uri=str(root / "scores"),
                export_format=fmt,
                output_uri=str(root / f"out-{fmt}"),
            )
            t0 = time.perf_counter()
            record = run_export(config, emit=lambda *_: None)
            seconds = time.perf_counter() - t0
            want = args.groups * (args.candidates if fmt == "prm" else 1)
            assert record["rows"] == want and record["groups_exported"] == args.groups, record
            results.append(
                {
                    "format": fmt,
                    "groups": args.groups,
                    "candidates": args.groups * args.candidates,
                    "rows": record["rows"],
                    "files": len(record["files"]),
                    "seconds": round(seconds, 1),
                    "candidates_per_s": round(args.groups * args.candidates / seconds),
                }
            )
            print(json.dumps(results[-1]))
        ray.shutdown()
    machine = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "ray_cpus": args.cpus,
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(machine))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
