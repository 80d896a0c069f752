"""Kill -9 of a running job (driver and its local Ray), rerun: every candidate exactly once.

The job runs as a user runs it (``python -m visualprm_ray score``) in its own process group and
its own Ray temp dir. As soon as its first output file appears the whole group is SIGKILLed; Ray
workers live in process groups of their own and may outlive the driver for a few seconds, so the
test waits until every process of that Ray is gone before rerunning the same command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pyarrow.parquet as pq
import pytest

from visualprm_ray.model.prm import VisualPRM
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

GROUPS = make_groups(40, candidates=3, seed=11)


def _ray_processes(temp_root: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_root in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _command(inputs, out, model, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "visualprm_ray",
        "score",
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--model",
        str(model),
        "--set",
        "model.dtype=float32",
        "--set",
        "runtime.cpus_per_preparer=0.5",
        "--set",
        "runtime.groups_per_batch=2",
        "--set",
        "input.num_blocks=10",
        "--set",
        "output.min_rows_per_file=1",
        "--set",
        "runtime.progress_interval_s=5",
        *extra,
    ]


def _env(temp_root: str) -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=temp_root)
    env.pop("RAY_ADDRESS", None)
    return env


def test_sigkill_then_rerun_is_exactly_once(tiny_model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(inputs, GROUPS, 4)
    # Short: Ray's unix socket paths live below it and must stay under 107 characters.
    temp_root = tempfile.mkdtemp(prefix="vpr", dir="/tmp")
    started = time.perf_counter()
    proc = subprocess.Popen(
        _command(inputs, out, tiny_model),
        env=_env(temp_root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not list(out.glob("*.parquet")):
            assert proc.poll() is None, "the job ended before writing anything"
            assert time.perf_counter() - started < 300, "no output after 300 s"
            time.sleep(0.05)
        killed_at = time.perf_counter() - started
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    # Wait for the killed Ray's stragglers (they may still commit a file), then make sure.
    deadline = time.monotonic() + 60
    while _ray_processes(temp_root) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _ray_processes(temp_root)
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=30)
    files_after_kill = sorted(p.name for p in out.glob("*.parquet"))
    assert not (out / "_SUCCESS").exists()

    rerun_started = time.perf_counter()
    result = subprocess.run(
        _command(inputs, out, tiny_model), env=_env(temp_root), capture_output=True, text=True, timeout=600
    )
    rerun_s = time.perf_counter() - rerun_started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming:" in result.stdout

    rows = pq.read_table(out).to_pylist()
    keys = [(r["id"], r["candidate_index"]) for r in rows]
    expected = {(g["id"], k) for g in GROUPS for k in range(3)}
    assert len(keys) == len(set(keys)) == len(expected)  # nothing doubled
    assert set(keys) == expected  # nothing lost
    assert all(r["error"] is None for r in rows)

    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["skipped"] > 0, "the kill came after a commit, so something must be kept"
    assert counts["scored"] < len(expected), "committed work was redone"
    assert counts["skipped"] + counts["scored"] == len(expected)
    assert manifest["status"] == "complete" and (out / "_SUCCESS").exists()
    # Every file the killed run had committed (readable) is still there: its work was kept.
    kept = {os.path.basename(f) for f in files_after_kill} - {
        os.path.basename(f) for f in manifest["resume"]["files_removed"]
    }
    assert kept <= {p.name for p in out.glob("*.parquet")}
    print(
        f"killed at {killed_at:.1f}s with {len(files_after_kill)} file(s) written; rerun {rerun_s:.1f}s: "
        f"{counts['skipped']} candidates kept, {counts['scored']} scored, "
        f"{len(manifest['resume']['files_removed'])} torn file(s) removed"
    )

    # The resumed table scores as a single in-process pass would.
    prm = VisualPRM.from_pretrained(tiny_model, device="cpu", dtype="float32")
    by_key = {(r["id"], r["candidate_index"]): r["step_scores"] for r in rows}
    for g in GROUPS[::8]:
        for k, scored in enumerate(prm.score(g["question"], g["responses"], images=[g["image"]])):
            assert by_key[(g["id"], k)] == pytest.approx(scored.step_scores, abs=1e-4)

    # A rerun of the finished job is a no-op: not one file touched.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(
        _command(inputs, out, tiny_model), env=_env(temp_root), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    shutil.rmtree(temp_root, ignore_errors=True)
