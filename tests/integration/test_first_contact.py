"""A newcomer's mistakes, fed through the command line: each gets one line naming the thing, what is
wrong and what to set, and an exit status; no traceback (unless --debug), nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "score", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=300,
    )


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("visualprm-ray:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def workdir(tmp_path, tiny_model) -> Path:
    write_shards(tmp_path / "grouped", make_groups(4, candidates=2, seed=3), 1)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-prm").symlink_to(tiny_model, target_is_directory=True)
    return tmp_path


def test_a_typo_in_the_model_path(workdir):
    result = _cli("--input", "grouped", "--output", "out", "--model", "models/tiny-prn", cwd=workdir)
    assert result.returncode == 2
    line = _one_line(result)
    assert "model: models/tiny-prn is not a directory" in line and "did you mean" in line
    assert "tiny-prm" in line
    assert not (workdir / "out").exists()  # nothing written: the corrected rerun starts clean


def test_a_directory_that_is_not_a_checkpoint(workdir):
    (workdir / "empty").mkdir()
    (workdir / "empty" / "notes.txt").write_text("not a model")
    result = _cli("--input", "grouped", "--output", "out", "--model", "empty", cwd=workdir)
    assert result.returncode == 2
    assert "config.json" in _one_line(result)


def test_a_typo_in_the_input_path(workdir):
    result = _cli("--input", "grouepd/", "--output", "out", "--model", "models/tiny-prm", cwd=workdir)
    assert result.returncode == 2
    line = _one_line(result)
    assert "input: nothing at grouepd/" in line and f"did you mean {workdir / 'grouped'}" in line
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("a-file/out", "is under"),
        ("a-file", "is a file"),
    ],
)
def test_an_output_that_cannot_be_a_directory(workdir, output, expected):
    (workdir / "a-file").write_text("")
    result = _cli("--input", "grouped", "--output", output, "--model", "models/tiny-prm", cwd=workdir)
    assert result.returncode == 2
    assert expected in _one_line(result)


def test_an_unwritable_output(workdir):
    # /proc takes no new directories, whoever asks (root included).
    result = _cli(
        "--input", "grouped", "--output", "/proc/visualprm-out", "--model", "models/tiny-prm", cwd=workdir
    )
    assert result.returncode == 2
    assert "output: cannot write to /proc/visualprm-out" in _one_line(result)


def test_s3_without_credentials(workdir, s3_server):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environ |= {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",  # nothing beyond loopback is asked
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
        "AWS_CONFIG_FILE": str(workdir / "none"),
        "PYTHONPATH": str(ROOT),
    }
    command = ["score", "--input", "s3://rollouts/in/", "--output", "out", "--model", "models/tiny-prm"]
    result = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", *command],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=environ,
        timeout=300,
    )
    assert result.returncode == 2
    line = _one_line(result)
    assert "input: no credentials for s3://rollouts/in/" in line and "AWS_ACCESS_KEY_ID" in line


def test_a_list_column_of_another_name_under_layout_auto(workdir):
    (workdir / "cand").mkdir()
    pq.write_table(
        pa.table({"prompt_id": ["a"], "question": ["q"], "candidates": [["x", "y"]]}),
        workdir / "cand" / "a.parquet",
    )
    result = _cli("--input", "cand", "--output", "out", "--model", "models/tiny-prm", cwd=workdir)
    assert result.returncode == 2
    line = _one_line(result)
    assert "layout auto chose flat because the input has no 'responses' column" in line
    assert "set input.responses_column=candidates" in line
    assert not (workdir / "out").exists()


def test_debug_shows_the_traceback(workdir):
    result = _cli("--input", "nope", "--output", "out", "--model", "models/tiny-prm", "--debug", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "SetupError" in result.stderr


def test_the_config_command_lists_every_field():
    result = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "runtime.max_errored_fraction" in result.stdout and "images.root" in result.stdout
    yaml_text = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "config", "--format", "yaml"], capture_output=True, text=True
    ).stdout
    import yaml

    from visualprm_ray.job.config import JobConfig

    starting = yaml.safe_load(yaml_text)
    assert set(starting) == set(JobConfig.model_fields)
    assert "# required" in yaml_text


def test_a_run_where_every_row_errored_fails_and_the_corrected_rerun_works(
    ray_local, tiny_model, tmp_path, capsys
):
    """The flat file with bare image names and no images.root: exit 4 with a verdict, no _SUCCESS;
    the rerun with images.root to the same output starts over and succeeds."""
    images = tmp_path / "images"
    write_shards(
        tmp_path / "flat",
        make_groups(4, candidates=2, seed=5),
        1,
        layout="flat",
        image_mode="relative_path",
        images_dir=images,
    )
    args = [
        "score",
        "--input",
        str(tmp_path / "flat"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model),
    ]
    args += ["--set", "model.dtype=float32"]
    assert main(args) == 4
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("visualprm-ray:")][-1]
    assert "8 of 8 candidates (100%) ended with an error" in line
    assert "image_missing" in line and "images.root" in line
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed_verdict" and manifest["verdict"]["dominant_kind"] == "image_missing"
    # The row error says what the path was resolved against.
    table = pq.read_table(tmp_path / "out")
    assert "images.root" in table["error"][0].as_py()

    assert main([*args, "--set", f"images.root={images}"]) == 0
    out = capsys.readouterr().out
    assert "starting over" in out
    table = pq.read_table(tmp_path / "out")
    assert len(table) == 8 and table["error"].null_count == 8
