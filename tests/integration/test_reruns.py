"""What a rerun does to an output that already holds a run: the same job goes on or does nothing,
another model or setting is refused naming what changed, new input is scored (real local Ray)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.job.driver import MANIFEST, SUCCESS
from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

ARGS = ["--set", "model.dtype=float32", "--set", "runtime.cpus_per_preparer=0.5"]


def _score(inputs, out, model, *extra: str) -> int:
    return main(["score", "--input", str(inputs), "--output", str(out), "--model", str(model), *ARGS, *extra])


@pytest.fixture(scope="module")
def finished(ray_local, tiny_model, tmp_path_factory):
    """One finished run of 4 groups x 2 candidates, copied by each test that changes it."""
    root = tmp_path_factory.mktemp("rerun")
    write_shards(root / "in", make_groups(4, candidates=2, seed=3), 2)
    assert _score(root / "in", root / "out", tiny_model) == 0
    return root


def _copy(finished, tmp_path, *, copy_input: bool = False):
    """The finished run's output copied for one test, and its input (the same files, or a copy)."""
    shutil.copytree(finished / "out", tmp_path / "out")
    if not copy_input:
        return finished / "in", tmp_path / "out"
    shutil.copytree(finished / "in", tmp_path / "in")
    return tmp_path / "in", tmp_path / "out"


def test_a_finished_run_of_the_same_job_is_a_no_op(finished, tiny_model, tmp_path, capsys):
    inputs, out = _copy(finished, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    assert _score(inputs, out, tiny_model) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == before


def test_weights_that_differ_only_in_value_do_not_resume_into_the_same_table(
    finished, tiny_model, tmp_path, capsys
):
    inputs, out = _copy(finished, tmp_path)
    retrained = shutil.copytree(tiny_model, tmp_path / "retrained")
    shutil.copy(write_tiny_checkpoint(tmp_path / "seed1", seed=1) / "model.safetensors", retrained)
    for state in ("complete", "interrupted"):
        if state == "interrupted":
            (out / SUCCESS).unlink()
        assert _score(inputs, out, retrained) == 2, state
        err = capsys.readouterr().err
        assert "model.identity" in err and "Traceback" not in err, err
    assert _score(inputs, out, tiny_model) == 0  # the original model resumes and finishes


def test_a_finished_run_rerun_with_another_scoring_setting_is_refused_naming_it(
    finished, tiny_model, tmp_path, capsys
):
    inputs, out = _copy(finished, tmp_path)
    assert _score(inputs, out, tiny_model, "--set", "scoring.max_steps=4") == 2
    err = capsys.readouterr().err
    assert "scoring.max_steps: 12 -> 4" in err
    assert (out / SUCCESS).exists()  # the finished run is left as it was


def test_a_finished_run_rerun_with_one_more_input_file_scores_the_new_ids(
    finished, tiny_model, tmp_path, capsys
):
    inputs, out = _copy(finished, tmp_path, copy_input=True)
    more = make_groups(7, candidates=2, seed=3)[4:]  # three new groups, ids geo-00004..6
    write_shards(tmp_path / "more", more, 1)
    shutil.copy(tmp_path / "more" / "part-00000.parquet", inputs / "part-00009.parquet")
    assert _score(inputs, out, tiny_model) == 0
    assert "the input changed" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    counts = manifest["counts"]
    assert (counts["candidates_in"], counts["skipped"], counts["scored"]) == (14, 8, 6)
    rows = pq.read_table(out, columns=["id", "candidate_index"]).to_pylist()
    assert len(rows) == 14 and len({(r["id"], r["candidate_index"]) for r in rows}) == 14
    assert (out / SUCCESS).exists()
    assert _score(inputs, out, tiny_model) == 0  # and now it is a no-op again
    assert "nothing to do" in capsys.readouterr().out


def _tiny_png(value: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, value // 256 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rows_sharing_their_texts_but_not_their_images_never_share_an_id(ray_local, tiny_model, tmp_path):
    """2,000 multiple-choice rows without an id column: two rows per text, each with its own image.
    Ids derived from the file and the row position are unique: every candidate comes out once."""
    rows = 2000
    table = pa.table(
        {
            "question": [f"Which option matches figure {i // 2}?" for i in range(rows)],
            "responses": [["A.", "B."] for _ in range(rows)],
            "image": [_tiny_png(i) for i in range(rows)],
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 1200), tmp_path / "in" / "a.parquet", row_group_size=300)
    pq.write_table(table.slice(1200), tmp_path / "in" / "b.parquet", row_group_size=300)
    out = tmp_path / "out"
    assert (
        _score(
            tmp_path / "in",
            out,
            tiny_model,
            "--set",
            "scoring.max_steps=1",
            "--set",
            "runtime.groups_per_batch=64",
            "--set",
            "runtime.progress_interval_s=60",
        )
        == 0
    )
    result = pq.read_table(out, columns=["id", "candidate_index", "error"]).to_pylist()
    assert len(result) == 2 * rows and all(r["error"] is None for r in result)
    assert len({(r["id"], r["candidate_index"]) for r in result}) == 2 * rows
    ids = {r["id"] for r in result}
    assert len(ids) == rows and {"a.parquet#0", "a.parquet#1199", "b.parquet#0", "b.parquet#799"} <= ids
    counts = json.loads((out / MANIFEST).read_text())["counts"]
    assert counts["candidates_in"] == counts["scored"] == 2 * rows and counts["duplicates"] == 0
