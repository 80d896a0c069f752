"""Every GPU check of a device session, in one command: CUDA parity tests, then the 8B benchmark.

A GPU is lent for minutes at a time, so the checks that need one are prepared here and run in one
go, each step's output kept in --out even when a later step fails:
  1. `pytest -m gpu tests/model/test_prm.py tests/model/scoring`: every layout and every fast path
     (KernelOptions) against the naive forward on the device in float32 and bf16, and the flash,
     variable-length flash and merge kernels in bf16 against float32 at VisualPRM-8B's attention
     shapes (32 query heads over 8 key/value heads, a ~3.5k-token prefix);
  2. `gpu_scorer.py --fresh-shapes` on the issue's shape (16 groups x 8 candidates, 13 tiles,
     ~400-token responses): the upstream loop, then every variant of SESSION_VARIANTS (the default
     first and last) on one set of fresh groups;
  3. the same with response lengths spread by +-50%, where padded and packed candidate rows
     differ most: the default, shared_prefix alone and with every fast path;
  4. a kernel profile of shared_prefix with every fast path (`--profile`), for the next round.
Expected 6-8 minutes on an H100 or H200, most of it step 1's compiles. With --tiny, steps 2-4 run at
tiny sizes on the CPU (the test suite does that; step 1's tests run on CPU there as they are).
Usage: python benchmarks/gpu_session.py --out DIR [--tiny] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout runs without an install (the device image has no Ray): the package from ROOT, the
# variant list from the sibling script.
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_scorer import SESSION_VARIANTS  # noqa: E402  (a sibling script, not a package)

BEST_GUESS = "shared_prefix+all"


def steps(out: Path, *, tiny: bool = False) -> list[tuple[str, list[str]]]:
    py = sys.executable
    bench = str(ROOT / "benchmarks" / "gpu_scorer.py")
    common = ["--fresh-shapes", "--upstream-groups", "2", "--fp32-layers", "1", *(["--tiny"] if tiny else [])]
    plan = [
        (
            "pytest",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "tests/model/test_prm.py",
                "tests/model/scoring",
            ],
        ),
        ("gpu", [py, bench, *common, "--variants", SESSION_VARIANTS, "--json", str(out / "gpu.json")]),
        (
            "gpu-spread",
            [
                py,
                bench,
                *common,
                "--response-spread",
                "0.5",
                "--variants",
                f"default,shared_prefix,{BEST_GUESS}",
                "--json",
                str(out / "gpu-spread.json"),
            ],
        ),
        (
            "profile",
            [
                py,
                bench,
                *common,
                "--groups",
                "4",
                "--variants",
                "default",
                "--profile",
                BEST_GUESS,
                "--json",
                str(out / "profile.json"),
            ],
        ),
    ]
    return [step for step in plan if not (tiny and step[0] == "pytest")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for each step's log and JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    parser.add_argument("--tiny", action="store_true", help="the benchmark steps at tiny sizes on the CPU")
    args = parser.parse_args()
    plan = steps(args.out, tiny=args.tiny)
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
