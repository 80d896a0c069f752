"""The exactly-once check's counts, and counting the input (no Ray)."""

from __future__ import annotations

import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.counts import Counts, count_input
from visualprm_ray.job.inputs import plan_read


def test_counts_name_every_way_the_output_can_be_wrong():
    ok = Counts(candidates_in=10, scored=6, errored=1, skipped=3)
    assert ok.problems() == []
    lost = Counts(candidates_in=10, scored=6, errored=1, skipped=2, missing=1)
    assert [p.split(" ")[0] for p in lost.problems()] == ["candidates", "1"]
    doubled = Counts(candidates_in=10, scored=7, errored=1, skipped=3, duplicates=1)
    assert len(doubled.problems()) == 2 and "more than once" in doubled.problems()[1]
    empty = Counts(candidates_in=0, empty_groups=2, empty_group_rows=1)
    assert empty.problems() == ["2 group(s) without candidates in the input, 1 such row(s) in the output"]


def _input(path, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(exist_ok=True)
    rows = [{"id": i, "question": "Q?", "responses": ["a", "b"]} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_repeated_or_null_group_ids_are_refused_before_the_job(tmp_path):

    _input(tmp_path / "in" / "a.parquet", ["g1", "g2"])
    _input(tmp_path / "in" / "b.parquet", ["g3", "g2"])
    config = JobConfig.from_sources(
        None, [], input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_source="/m"
    )
    with pytest.raises(ValueError, match="'g2' appears more than once"):
        count_input(config, plan_read(config))
    _input(tmp_path / "in" / "b.parquet", ["g3", None])
    with pytest.raises(ValueError, match="null 'id'"):
        count_input(config, plan_read(config))
    _input(tmp_path / "in" / "b.parquet", ["g3", "g4"])
    plan = plan_read(config)
    counts, ids = count_input(config, plan)
    assert (counts.groups_in, counts.candidates_in) == (4, 8)
    assert [a.to_pylist() for a in ids] == [["g1", "g2"], ["g3", "g4"]]  # kept for planning a resume
    # The plan indexes each file's row groups for the read stage.
    assert [(f.uri.rsplit("/", 1)[-1], f.row_group_rows) for f in plan.files] == [
        ("a.parquet", (2,)),
        ("b.parquet", (2,)),
    ]


def test_candidates_are_counted_from_the_footer_when_it_can_tell(tmp_path, monkeypatch):
    """No null and no empty list in a row group: its responses leaf's value count is its candidates,
    and not a byte of response text is read. Otherwise the row group's responses are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visualprm_ray import storage

    (tmp_path / "in").mkdir()
    clean = {"question": ["Q"] * 4, "responses": [["a", "b"], ["c"], ["d", "e", "f"], ["g"]]}
    pq.write_table(pa.table(clean), tmp_path / "in" / "a.parquet", row_group_size=2)
    holes = {"question": ["Q"] * 4, "responses": [["a"], [], None, ["b", None]]}
    pq.write_table(pa.table(holes), tmp_path / "in" / "b.parquet", row_group_size=2)
    config = JobConfig.from_sources(
        None, [], input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_source="/m"
    )
    plan = plan_read(config)
    assert [f.candidates for f in plan.files] == [(3, 4), (None, None)]
    reads = []
    real = storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda uri, *a, **k: reads.append(uri) or real(uri, *a, **k))
    counts, _ = count_input(config, plan)
    assert (counts.groups_in, counts.candidates_in, counts.empty_groups) == (8, 7 + 3, 2)
    assert [r.rsplit("/", 1)[-1] for r in reads] == ["b.parquet"]
