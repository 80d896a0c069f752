"""Every GPU check of a device session, in one command: CUDA parity tests, then the 8B benchmark.

A GPU is lent for minutes at a time, so the checks that need one are prepared here and run in one
go, each step's output kept in --out even when a later step fails:
  1. `pytest -m gpu tests/model/test_prm.py`: every prefix layout against the naive forward on the
     device, in float32 and bf16, with small and default token budgets (the CUDA kernels);
  2. `gpu_scorer.py --fresh-shapes` on the issue's shape (16 groups x 8 candidates, 13 tiles,
     ~400-token responses): upstream loop and every layout;
  3. the same with response lengths spread by +-50%, where padded and packed candidate rows
     differ most: the two prefix layouts only.
About 4-6 minutes on an H200. Usage: python benchmarks/gpu_session.py --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(out: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    bench = str(ROOT / "benchmarks" / "gpu_scorer.py")
    common = ["--fresh-shapes", "--upstream-groups", "2", "--fp32-layers", "1"]
    return [
        (
            "pytest",
            [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/model/test_prm.py"],
        ),
        ("gpu", [py, bench, *common, "--json", str(out / "gpu.json")]),
        (
            "gpu-spread",
            [
                py,
                bench,
                *common,
                "--response-spread",
                "0.5",
                "--variants",
                "prefix_cache:sdpa/no_cudnn,shared_prefix:sdpa/no_cudnn",
                "--json",
                str(out / "gpu-spread.json"),
            ],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for each step's log and JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    args = parser.parse_args()
    plan = steps(args.out)
    if args.dry_run:
        for name, command in plan:
            print(f"{name}: {' '.join(command)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # The scorer runs from the checkout without an install (the device image has no Ray).
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    }
    env["PYTHONUNBUFFERED"] = "1"
    failed = []
    for name, command in plan:
        start = time.perf_counter()
        with (args.out / f"{name}.log").open("w") as log:
            # Output to the terminal and the log alike, line by line.
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = proc.wait()
        print(f"== {name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed steps: {', '.join(failed)}")


if __name__ == "__main__":
    main()
