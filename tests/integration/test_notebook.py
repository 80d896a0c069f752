"""notebooks/inspect_scores.ipynb runs top to bottom on a real run and computes what it says."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "inspect_scores.ipynb"


def _source(nb, pattern: str) -> re.Match:
    for cell in nb.cells:
        if cell.cell_type == "code" and (m := re.search(pattern, cell.source, re.M)):
            return m
    raise AssertionError(f"no code cell matches {pattern!r}")


def _stream(nb) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # The run is chosen in one place: the first code cell, from the environment.
    assert "VISUALPRM_OUTPUT" in code[0].source and "visualprm-demo/scores" in code[0].source


def _this_kernel(tmp_path, monkeypatch, output: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    # A python3 kernelspec that names this interpreter, first on JUPYTER_PATH: whatever kernels the
    # machine has, the notebook runs in the venv under test.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "venv", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("VISUALPRM_OUTPUT", str(output))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into PNGs
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


@pytest.mark.slow
def test_notebook_runs_on_an_output_without_the_optional_columns(demo_run, tmp_path, monkeypatch):
    """Any run, not only the demo's: without `policy` and `answer` the optional sections say so."""
    import shutil

    import nbformat
    import pyarrow.parquet as pq
    from nbclient import NotebookClient

    workdir, _ = demo_run
    output = tmp_path / "bare"
    shutil.copytree(workdir / "scores", output)
    for path in output.glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(
            table.drop_columns([c for c in ("policy", "answer", "subject") if c in table.column_names]), path
        )
    _this_kernel(tmp_path, monkeypatch, output)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = _stream(nb)
    assert "no 'policy' column in this run: skipping the comparison of policies" in printed
    assert "kept for RLHF:" in printed


@pytest.mark.slow
def test_notebook_runs_on_the_demo_output(demo_run, tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    workdir, _ = demo_run
    output = workdir / "scores"
    _this_kernel(tmp_path, monkeypatch, output)
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = "import sys, json\nprint('PROBE', json.dumps({'exe': sys.executable, 'policy': by_policy.to_dicts()}))"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    printed = _stream(nb)
    probe_out = json.loads(printed.split("PROBE ", 1)[1])
    assert Path(probe_out["exe"]).resolve() == Path(sys.executable).resolve()

    # The RLHF filter, recomputed here with pandas from the thresholds the notebook sets.
    min_score = float(_source(nb, r"^MIN_SCORE = ([0-9.]+)").group(1))
    step_threshold = float(_source(nb, r"^STEP_THRESHOLD = ([0-9.]+)").group(1))
    frame = pd.read_parquet(output)
    scored = frame[frame["error"].isna()]
    no_low_step = scored["step_scores"].map(lambda s: bool((np.asarray(s) >= step_threshold).all()))
    kept = int(((scored["score"] >= min_score) & no_low_step).sum())
    assert 0 < kept < len(scored)  # the demo's defaults keep some rollouts and drop others
    assert f"kept for RLHF: {kept} of {len(scored)} scored rollouts" in printed
    assert f"DuckDB agrees on all {len(scored)} rollouts" in printed

    # Per-policy means and win rates as pandas computes them.
    by_policy = {row["policy"]: row for row in probe_out["policy"]}
    expected = scored.groupby("policy")["score"].mean()
    assert set(by_policy) == set(expected.index) == {"policy-a", "policy-b"}
    for policy, mean in expected.items():
        assert by_policy[policy]["mean_score"] == pytest.approx(mean, rel=1e-5)
        assert by_policy[policy]["win_rate"] == pytest.approx(
            scored.loc[scored.policy == policy, "is_best"].mean()
        )

    # The per-policy score plot came out as an image.
    images = [
        o["data"]["image/png"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG")
