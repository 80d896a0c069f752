"""The command line on real data: `visualprm-ray score` and the demo, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from visualprm_ray.cli import main
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow


def test_score_command_with_config_and_overrides(ray_local, tiny_model, tmp_path):
    write_shards(tmp_path / "in", make_groups(6, candidates=3, seed=2), 2)
    config = tmp_path / "job.yaml"
    config.write_text(
        "model:\n  dtype: bfloat16\nscoring:\n  max_steps: 4\nruntime:\n  cpus_per_preparer: 0.5\n"
        "output:\n  uri: /nonexistent/overridden/by/the/flag\n"
    )
    code = main(
        [
            "score",
            "--config",
            str(config),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model),
            "--set",
            "model.dtype=float32",  # --set wins over the YAML
            "--set",
            "output.include_response=false",
        ]
    )
    assert code == 0
    frame = pd.read_parquet(tmp_path / "out")
    assert len(frame) == 18
    assert frame["response"].isna().all()
    assert frame["num_steps"].max() <= 4  # scoring.max_steps from the YAML
    manifest = pd.read_json(tmp_path / "out" / "_manifest.json", typ="series")
    assert manifest["config"]["model"]["dtype"] == "float32"


def test_bad_config_exits_2_and_names_the_key(tmp_path):
    cli = [sys.executable, "-m", "visualprm_ray", "score", "--input", "a", "--output", "b", "--model", "c"]
    result = subprocess.run(
        [*cli, "--set", "scoring.max_stepz=3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "scoring.max_stepz" in result.stderr


def test_demo_command_runs_the_full_pipeline(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "scored: 96, errored: 0, rows written: 96" in out
    assert "best-of-N picks" in out and "steps [" in out
    assert str(tmp_path / "demo" / "scores") in out
    assert len(pd.read_parquet(tmp_path / "demo" / "scores")) == 96
