"""The command line: fast help, and the commands doing what they say."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from visualprm_ray.model.checkpoint import load_checkpoint


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys, time; t = time.time(); from visualprm_ray.cli import build_parser; "
        "import visualprm_ray; visualprm_ray.__version__; "
        "print(time.time() - t, any(m in sys.modules for m in ('torch', 'transformers', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    elapsed, heavy = out.split()
    assert heavy == "False"
    assert float(elapsed) < 1.0
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "visualprm_ray", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "tiny-checkpoint" in result.stdout
    assert time.time() - start < 5


def test_tiny_checkpoint_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "tiny-checkpoint", str(tmp_path / "ck"), "--seed", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert "llm_config" in config and "vision_config" in config
    assert load_checkpoint(tmp_path / "ck", dtype="float32").info.layout == "upstream"


def _score_with_run_job(monkeypatch, argv, outcome=None):
    """Run ``score`` with the job replaced by a recorder (or a failure); returns (status, config)."""
    import visualprm_ray.job.driver as driver
    from visualprm_ray.cli import main

    seen = {}

    def fake_run_job(config, **_):
        seen["config"] = config
        if outcome is not None:
            raise outcome
        return {}

    monkeypatch.setattr(driver, "run_job", fake_run_job)
    status = main(["score", "--input", "/in", "--output", "/out", "--model", "/m", *argv])
    return status, seen.get("config")


def test_fresh_means_overwrite_and_resume_is_the_default(monkeypatch):
    status, config = _score_with_run_job(monkeypatch, [])
    assert status == 0 and config.output.mode == "resume"
    status, config = _score_with_run_job(monkeypatch, ["--fresh"])
    assert status == 0 and config.output.mode == "overwrite"


def test_exit_status_says_what_failed(monkeypatch, capsys):
    from visualprm_ray.job.driver import JobCheckError
    from visualprm_ray.job.resume import ResumeConflict

    status, _ = _score_with_run_job(
        monkeypatch, [], JobCheckError("2 candidate row(s) written more than once")
    )
    assert status == 3 and "more than once" in capsys.readouterr().err
    status, _ = _score_with_run_job(
        monkeypatch, [], ResumeConflict("holds part of a run with different scoring")
    )
    assert status == 2 and "different scoring" in capsys.readouterr().err


def test_serve_refuses_to_start_without_a_token_before_anything_starts(monkeypatch, capsys):
    import ray

    from visualprm_ray.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a server that cannot run")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("VISUALPRM_SERVE_TOKEN", raising=False)
    assert main(["serve", "--model", "/m", "--port", "8123"]) == 2
    assert "a bearer token is required" in capsys.readouterr().err
    assert main(["serve", "--model", "/m", "--set", "server.colour=1"]) == 2
    assert "bad configuration" in capsys.readouterr().err
