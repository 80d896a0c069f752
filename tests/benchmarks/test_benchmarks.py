"""The benchmark scripts keep working: each runs (or at least parses its arguments) in the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_help(script):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


@pytest.mark.slow
def test_gpu_scorer_runs_tiny_on_cpu(tmp_path):
    """The GPU benchmark's whole code path (8B-shaped builder, parity, timing) at tiny sizes."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_scorer.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fp32_parity_max_diff"] < 1e-4
    paths = {r["path"]: r for r in report["results"]}
    assert {"upstream loop", "ours (prefix_cache:sdpa)", "ours (packed:sdpa)"} <= set(paths)
    for r in paths.values():
        assert "error" not in r, r
        assert r["rollouts_per_s"] > 0
    assert paths["ours (prefix_cache:sdpa)"]["max_diff_vs_upstream"] < 2e-2
    assert paths["ours (shared_prefix:sdpa)"]["max_diff_vs_upstream"] < 2e-2


@pytest.mark.slow
def test_gpu_session_steps_are_runnable(tmp_path):
    """The device session's prepared steps: the gpu tests exist, and each benchmark step's arguments
    run through the whole script at tiny sizes on the CPU (--tiny appended)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_session", BENCHMARKS / "gpu_session.py")
    session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(session)
    plan = dict(session.steps(tmp_path))
    assert list(plan) == ["pytest", "gpu", "gpu-spread"]
    collected = subprocess.run(
        [*plan["pytest"], "--collect-only"], capture_output=True, text=True, cwd=BENCHMARKS.parent
    )
    assert collected.returncode == 0, collected.stdout[-2000:]
    assert "test_cuda_fast_path_matches_naive" in collected.stdout
    for name in ("gpu", "gpu-spread"):
        result = subprocess.run([*plan[name], "--tiny"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["fp32_parity_max_diff"] < 1e-4
        assert all("error" not in r for r in report["results"]), report["results"]
