"""The flat layout (one row per candidate): regrouped by id with images kept out of the shuffle,
candidates numbered in input order or by a configured column, checked (real local Ray)."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.evaluate.bon import run_eval_bon
from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import MANIFEST, run_job
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

GROUPS = make_groups(6, candidates=3, seed=11)


def _config(inputs, out, model, *extra: str) -> JobConfig:
    return JobConfig.from_sources(
        None,
        ["model.dtype=float32", "runtime.cpus_per_preparer=0.5", "output.mode=overwrite", *extra],
        input_uri=str(inputs),
        output_uri=str(out),
        model_source=str(model),
    )


def _flat_without_index(root, *, shuffle: bool = False):
    """The groups' flat rows with no candidate_index column; optionally every file's rows shuffled
    (keeping a ``position`` column that says each row's candidate index)."""
    write_shards(root, GROUPS, 2, layout="flat")
    for path in sorted(root.glob("*.parquet")):
        table = pq.read_table(path)
        table = table.rename_columns(
            ["position" if n == "candidate_index" else n for n in table.column_names]
        )
        if shuffle:
            order = list(range(len(table)))
            random.Random(path.name).shuffle(order)
            table = table.take(order)
        else:
            table = table.drop_columns(["position"])
        pq.write_table(table, path)
    return root


@pytest.fixture(scope="module")
def grouped_out(ray_local, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    write_shards(root / "in", GROUPS, 2)
    run_job(_config(root / "in", root / "out", tiny_model), emit=lambda *_: None)
    return root / "out"


def _keyed(out):
    rows = pq.read_table(out).to_pylist()
    return {(r["id"], r["candidate_index"]): r for r in rows}


def test_flat_input_order_is_the_candidate_index_and_best_of_n_agrees(grouped_out, tiny_model, tmp_path):
    inputs = _flat_without_index(tmp_path / "in")
    manifest = run_job(_config(inputs, tmp_path / "out", tiny_model), emit=lambda *_: None)
    assert manifest["layout"] == "flat" and manifest["counts"]["groups_in"] == 6
    flat, grouped = _keyed(tmp_path / "out"), _keyed(grouped_out)
    assert flat.keys() == grouped.keys()
    for key, row in flat.items():
        assert row["response"] == grouped[key]["response"], key  # the same candidate at each index
        assert row["score"] == pytest.approx(grouped[key]["score"], abs=1e-5)
    reports = [
        run_eval_bon(str(o), group_by="policy", emit=lambda *_: None) for o in (tmp_path / "out", grouped_out)
    ]
    flat_table, grouped_table = ({k: v for k, v in r.to_json().items() if k != "output"} for r in reports)
    assert flat_table == grouped_table and reports[0].overall.groups == 6
    assert not (tmp_path / "out" / "_regrouped").exists()  # a finished job leaves only its table


def test_a_configured_candidate_index_column_orders_shuffled_rows(grouped_out, tiny_model, tmp_path):
    inputs = _flat_without_index(tmp_path / "in", shuffle=True)
    run_job(
        _config(inputs, tmp_path / "out", tiny_model, "input.candidate_index_column=position"),
        emit=lambda *_: None,
    )
    flat, grouped = _keyed(tmp_path / "out"), _keyed(grouped_out)
    assert flat.keys() == grouped.keys()
    assert all(flat[k]["response"] == grouped[k]["response"] for k in flat)


def test_a_null_or_repeated_candidate_index_is_a_typed_error_not_a_collision(ray_local, tiny_model, tmp_path):
    write_shards(tmp_path / "in", GROUPS, 1, layout="flat")
    path = next((tmp_path / "in").glob("*.parquet"))
    table = pq.read_table(path)
    index = table["candidate_index"].to_pylist()
    index[1] = 0  # the first group repeats 0
    index[4] = None  # the second has a null
    pq.write_table(
        table.set_column(
            table.column_names.index("candidate_index"), "candidate_index", pa.array(index, pa.int32())
        ),
        path,
    )
    manifest = run_job(_config(tmp_path / "in", tmp_path / "out", tiny_model), emit=lambda *_: None)
    rows = _keyed(tmp_path / "out")
    assert len(rows) == 18  # every candidate once, numbered in input order where the column failed
    bad = {GROUPS[0]["id"]: "repeats a value", GROUPS[1]["id"]: "null value"}
    for (group, k), row in rows.items():
        if group in bad:
            assert row["error_kind"] == "invalid_candidate_index" and row["error_stage"] == "read"
            assert bad[group] in row["error"] and k in (0, 1, 2)
        else:
            assert row["error"] is None
    assert manifest["counts"]["errors_by_kind"] == {"invalid_candidate_index": 6}


def test_an_interrupted_flat_job_reuses_its_finished_regroup_pass(ray_local, tiny_model, tmp_path):
    from visualprm_ray.job import flat
    from visualprm_ray.job.inputs import plan_read

    write_shards(tmp_path / "in", GROUPS, 2, layout="flat", image_mode="list")
    config = _config(
        tmp_path / "in", tmp_path / "out", tiny_model, "output.mode=resume", "input.keep_image_bytes=true"
    )
    plan = plan_read(config)
    _, groups = flat.regrouped_plan(config, plan, emit=lambda *_: None)  # the pass ran, then the job died
    assert groups == 6 and (tmp_path / "out" / "_regrouped" / "_SUCCESS").exists()
    lines: list[str] = []
    manifest = run_job(config, emit=lines.append)
    assert any("reusing the regrouped input" in line for line in lines), lines
    assert manifest["counts"]["scored"] == 18
    # The images came back from the input files (lists of one or two here), one copy per candidate.
    given = {r["id"]: r["image"] for r in pq.read_table(tmp_path / "in", columns=["id", "image"]).to_pylist()}
    table = pq.read_table(tmp_path / "out", columns=["id", "image", "num_tiles"]).to_pylist()
    assert {len(v) for v in given.values()} == {1, 2}
    assert all(r["image"] == given[r["id"]] and r["num_tiles"] > 0 for r in table)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["status"] == "complete"


def test_shuffle_partitions_follow_the_inputs_size():
    from types import SimpleNamespace

    from visualprm_ray.job.flat import MAX_PARTITIONS, PARTITION_BYTES, num_partitions

    def plan(light: int, image: int):
        return SimpleNamespace(files=[SimpleNamespace(column_bytes=(("response", light), ("image", image)))])

    assert num_partitions(plan(1000, 10**12), "image") == 1  # images do not travel: not counted
    assert num_partitions(plan(10 * PARTITION_BYTES + 1, 0), "image") == 11
    assert num_partitions(plan(10**15, 0), "image") == MAX_PARTITIONS
