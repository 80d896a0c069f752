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
