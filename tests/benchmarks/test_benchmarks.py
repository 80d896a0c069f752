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
def test_gpu_session_runs_every_variant_tiny_on_cpu(tmp_path):
    """The device session as it will run, at tiny sizes on the CPU (--tiny): every variant of the
    GPU comparison scores, matches the naive forward in float32 and the upstream loop in bf16,
    and the profile step runs; the gpu tests it starts with are collected."""
    import importlib.util

    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_session", BENCHMARKS / "gpu_session.py")
    session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(session)
    plan = dict(session.steps(tmp_path))
    assert list(plan) == ["pytest", "gpu", "gpu-spread", "profile"]
    collected = subprocess.run(
        [*plan["pytest"], "--collect-only"], capture_output=True, text=True, cwd=BENCHMARKS.parent
    )
    assert collected.returncode == 0, collected.stdout[-2000:]
    for test in ("test_cuda_fast_paths_match_naive", "test_cuda_varlen_flash_at_real_shapes"):
        assert test in collected.stdout
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_session.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    variants = [v for v in session.SESSION_VARIANTS.split(",")]
    assert set(report["fp32_parity_by_mode"]) >= set(variants)
    assert report["fp32_parity_max_diff"] < 1e-4
    timed = [r for r in report["results"] if r["path"] != "upstream loop"]
    assert [r.get("variant") for r in timed] == variants, timed
    for r in timed:
        assert "error" not in r, r
        assert r["rollouts_per_s"] > 0 and r["max_diff_vs_upstream"] < 2e-2 and r["fp32_parity"] < 1e-4
    assert {r["options"] for r in timed if r["variant"] == "shared_prefix+all"} == {
        "attention=varlen,merge=compiled,leaf_ops=compiled,rotary=static,host_syncs=avoid"
    }
    spread = json.loads((tmp_path / "gpu-spread.json").read_text())
    assert all("error" not in r for r in spread["results"]), spread["results"]
    assert "profile of shared_prefix+all" in (tmp_path / "profile.log").read_text()


@pytest.mark.slow
def test_serve_load_test_runs_small(tmp_path):
    """The endpoint's load test end to end at a small count: served scores equal in-process ones."""
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "serve_cpu.py"),
            "--requests",
            "4",
            "--concurrency",
            "1,2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    assert report["max_diff"] <= 1e-5 and report["in_process_candidates_per_s"] > 0
    for level in report["levels"]:
        assert level["candidates_per_s"] > 0 and level["p50_s"] <= level["p95_s"] <= level["p99_s"]
