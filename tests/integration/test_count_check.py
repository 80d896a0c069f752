"""The count check on a real job: an output that does not match the input fails loudly.

A committed output file from an earlier attempt holds a group that is no longer in the input
(the input changed between attempts). The rerun resumes, scores the rest, finds more candidates
out than in, and must refuse the table: manifest ``failed_check``, no ``_SUCCESS``, exit 3.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.job.driver import MANIFEST, SUCCESS
from visualprm_ray.sample_data import make_groups, write_shards
from visualprm_ray.schema import output_schema

pytestmark = pytest.mark.slow


def test_output_with_a_group_gone_from_the_input_fails_the_check(ray_local, tiny_model, tmp_path, capsys):
    groups = make_groups(3, candidates=2, seed=4)
    write_shards(tmp_path / "in", groups, 1)
    out = tmp_path / "out"
    out.mkdir()
    # What an earlier attempt committed for a group since removed from the input.
    gone = [{"id": "removed-group", "candidate_index": k, "is_best": k == 0} for k in range(2)]
    schema = output_schema(
        [
            f
            for f in pq.read_schema(next((tmp_path / "in").glob("*.parquet")))
            if f.name in ("answer", "policy", "subject")
        ]
    )
    pq.write_table(pa.Table.from_pylist(gone, schema), out / "earlier-0.parquet")

    status = main(
        [
            "score",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(out),
            "--model",
            str(tiny_model),
            "--set",
            "model.dtype=float32",
            "--set",
            "runtime.cpus_per_preparer=0.5",
        ]
    )
    assert status == 3
    assert "failed the count check" in capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "failed_check"
    assert manifest["counts"]["skipped"] == 2 and manifest["counts"]["scored"] == 6
    assert manifest["problems"] == ["candidates in (6) != scored (6) + errored (0) + skipped (2)"]
    assert not (out / SUCCESS).exists()
