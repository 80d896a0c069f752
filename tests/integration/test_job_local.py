"""The whole Ray job on a real local Ray: shards in, one row per candidate out, read by real clients."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import MANIFEST, SUCCESS, run_job
from visualprm_ray.model.prm import VisualPRM
from visualprm_ray.sample_data import make_groups, write_shards
from visualprm_ray.schema import OUTPUT_SCHEMA

pytestmark = pytest.mark.slow


def _config(input_uri, output_uri, model, *extra: str, **sections) -> JobConfig:
    overrides = [
        "model.dtype=float32",
        "runtime.cpus_per_preparer=0.5",
        "runtime.progress_interval_s=5",
        "output.mode=overwrite",
        *extra,
    ]
    return JobConfig.from_sources(
        None, overrides, input_uri=str(input_uri), output_uri=str(output_uri), model_source=str(model)
    )


def _check_output(table, groups: int, candidates: int) -> None:
    """The acceptance checks, in SQL through DuckDB over the table as written."""
    con = duckdb.connect()
    con.register("rel", table)

    def one(sql: str):
        return con.execute(sql).fetchall()

    n, distinct = one("select count(*), count(distinct (id, candidate_index)) from rel where error is null")[
        0
    ]
    assert n == distinct == groups * candidates
    bad = one("select count(*) from rel, unnest(step_scores) as t(s) where s < 0 or s > 1 or s is null")
    assert bad == [(0,)]
    worst = one("select max(abs(score - list_avg(step_scores))) from rel")[0][0]
    assert worst < 1e-6
    assert one("select id, sum(is_best::int) as b from rel group by id having b != 1") == []
    ranks = one("select id, list_sort(list(rank)) as r, count(*) as n from rel group by id")
    assert all(r == list(range(n)) for _, r, n in ranks)


@pytest.fixture(scope="module")
def grouped_run(ray_local, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    groups = make_groups(24, candidates=4, seed=0)
    write_shards(root / "in", groups, 3)
    manifest = run_job(_config(root / "in", root / "out", tiny_model))
    return root, groups, manifest


def test_three_shards_96_rows_read_by_duckdb_pandas_polars(grouped_run):
    root, _, manifest = grouped_run
    out = root / "out"
    assert (out / SUCCESS).exists()
    assert json.loads((out / MANIFEST).read_text())["counts"] == manifest["counts"]
    counts = manifest["counts"]
    assert counts["candidates_in"] == counts["scored"] == counts["rows_out"] == 96
    assert counts["errored"] == 0
    assert (
        manifest["model"]["identity"].startswith("sha256:")
        and manifest["model"]["identity_kind"] == "content"
    )
    assert manifest["versions"]["ray"]
    duck = duckdb.connect().sql(f"select * from read_parquet('{out}/*.parquet')").to_arrow_table()
    _check_output(duck, 24, 4)
    frame = pd.read_parquet(out)
    assert len(frame) == 96 and frame.groupby("id")["is_best"].sum().eq(1).all()
    lazy = pl.scan_parquet(f"{out}/*.parquet").group_by("id").agg(pl.len().alias("n")).collect()
    assert lazy["n"].to_list() == [4] * 24
    # The written schema is the one defined in code, passthrough columns in between.
    schema = pq.read_schema(next(out.glob("*.parquet")))
    for field in OUTPUT_SCHEMA:
        assert schema.field(field.name).type == field.type
    assert schema.field("policy").type == schema.field("answer").type  # passthrough kept as string
    assert "image" not in schema.names  # image bytes dropped by default


def test_the_job_runs_the_layout_planned_for_this_machine(grouped_run, tiny_model):
    from visualprm_ray.job.layout import cluster_view, model_parameters, plan_layout, usable_cores

    root, _, manifest = grouped_run
    view = cluster_view()
    # The session's Ray declares 4 CPUs; the replicas are sized on the cores really there.
    assert len(view.nodes) == 1 and view.nodes[0].memory > 0
    assert view.nodes[0].cores == min(4, usable_cores())
    config = _config(root / "in", root / "out", tiny_model)
    planned = plan_layout(config, view, model_parameters(config))
    assert manifest["resources"] == {
        **planned.__dict__,
        "scorers_started": planned.num_scorers,
        "scorer_nodes": 1,
    }
    # A tiny checkpoint fits once per core; 4 Ray CPUs leave room for two replicas and a preparer.
    assert (planned.device, planned.num_scorers) == ("cpu", min(usable_cores(), 2))
    assert planned.cpu_threads_per_scorer == max(1, usable_cores() // planned.num_scorers)


def test_job_scores_equal_in_process_scores(grouped_run, tiny_model):
    """The pipeline adds no numerical change: same scores as VisualPRM.score in one process."""
    root, groups, _ = grouped_run
    frame = pd.read_parquet(root / "out").set_index(["id", "candidate_index"])
    prm = VisualPRM.from_pretrained(tiny_model, device="cpu", dtype="float32")
    for group in groups[:3]:
        results = prm.score(group["question"], group["responses"], group["image"])
        for k, r in enumerate(results):
            row = frame.loc[(group["id"], k)]
            assert np.abs(np.asarray(row["step_scores"]) - r.step_scores).max() < 1e-5
            assert row["rank"] == sorted(range(len(results)), key=lambda i: -results[i].score).index(k)


def test_flat_layout_matches_grouped(grouped_run, tiny_model, tmp_path):
    root, groups, _ = grouped_run
    write_shards(tmp_path / "in", groups, 2, layout="flat")
    manifest = run_job(_config(tmp_path / "in", tmp_path / "out", tiny_model))
    assert manifest["layout"] == "flat"
    assert manifest["counts"]["scored"] == 96
    flat = pd.read_parquet(tmp_path / "out").set_index(["id", "candidate_index"]).sort_index()
    grouped = pd.read_parquet(root / "out").set_index(["id", "candidate_index"]).sort_index()
    assert flat.index.equals(grouped.index)
    assert np.abs(flat["score"] - grouped["score"]).max() < 1e-5
    assert (flat["rank"] == grouped["rank"]).all()
    assert (flat["policy"] == grouped["policy"]).all()


@pytest.mark.parametrize("image_mode", ["hf_struct", "path", "relative_path", "list", "mixed"])
def test_image_representations(image_mode, ray_local, tiny_model, tmp_path):
    groups = make_groups(4, candidates=2, seed=1)
    images_dir = tmp_path / "images"
    write_shards(tmp_path / "in", groups, 2, image_mode=image_mode, images_dir=str(images_dir))
    extra = [f"images.root={images_dir}"] if image_mode == "relative_path" else []
    manifest = run_job(_config(tmp_path / "in", tmp_path / "out", tiny_model, *extra))
    assert manifest["counts"]["scored"] == 8, manifest["counts"]
    table = pq.read_table(tmp_path / "out")
    _check_output(table, 4, 2)
    tiles = dict(zip(table["id"].to_pylist(), table["num_tiles"].to_pylist(), strict=True))
    if image_mode == "mixed":
        assert 0 in tiles.values() and any(v > 0 for v in tiles.values())
    else:
        assert all(v > 0 for v in tiles.values())


def test_building_the_datasets_raises_no_deprecation_warning(ray_local, tiny_model, tmp_path):
    """Ray 2.60 deprecates ``**ray_remote_args`` (gone in 2.64): retries and the runtime env are set
    the way it supports, for the scoring pass and the flat layout's regroup pass alike."""
    import warnings

    from visualprm_ray.job.flat import regroup_dataset
    from visualprm_ray.job.inputs import plan_read
    from visualprm_ray.job.layout import plan_resources
    from visualprm_ray.job.pipeline import build_dataset

    groups = make_groups(2, candidates=2, seed=4)
    write_shards(tmp_path / "grouped", groups, 1)
    write_shards(tmp_path / "flat", groups, 1, layout="flat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = _config(tmp_path / "grouped", tmp_path / "out", tiny_model)
        build_dataset(config, plan_read(config), plan_resources(config))
        config = _config(tmp_path / "flat", tmp_path / "out", tiny_model)
        regroup_dataset(config, plan_read(config))
    from ray.util.annotations import RayDeprecationWarning

    import visualprm_ray

    ours = str(Path(visualprm_ray.__file__).parent)
    # Ray's DataContext warns about its own deprecated fields whenever it is copied: not ours to fix.
    deprecated = [
        w
        for w in caught
        if issubclass(w.category, RayDeprecationWarning)
        or (issubclass(w.category, DeprecationWarning) and w.filename.startswith(ours))
    ]
    assert deprecated == [], [f"{w.filename}: {w.message}" for w in deprecated]
