"""The driver's view of the input: every file's schema checked before the job starts (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.inputs import InputSchemaError, plan_read, relative_names


def _config(root, *overrides: str) -> JobConfig:
    return JobConfig.from_sources(
        None, list(overrides), input_uri=str(root), output_uri=str(root.parent / "out"), model_source="/m"
    )


def _write(path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    base = {
        "id": [f"{path.stem}-{i}" for i in range(n)],
        "question": ["Q?"] * n,
        "responses": [["a", "b"]] * n,
    }
    pq.write_table(pa.table({**base, **columns}), path)


def test_a_shard_whose_image_column_has_another_name_is_refused_naming_it(tmp_path):
    _write(tmp_path / "in" / "a.parquet", image=[b"png"], policy=["p"])
    _write(tmp_path / "in" / "b.parquet", img=[b"png"], policy=["p"])
    with pytest.raises(InputSchemaError) as info:
        plan_read(_config(tmp_path / "in"))
    message = str(info.value)
    assert "b.parquet" in message and "lacks column(s) ['image']" in message


@pytest.mark.parametrize(
    ("second", "says"),
    [
        ({"drop": "id"}, "lacks column(s) ['id']"),
        ({"drop": "policy"}, "lacks column(s) ['policy']"),
        ({"set": {"question": [7]}}, "column 'question' is int64, the first file's is string"),
        ({"set": {"policy": [1.5]}}, "column 'policy' is double"),
        ({"set": {"steps": [[["s"], ["t"]]]}}, "has column(s) ['steps'] that the first file lacks"),
        ({"set": {"extra": [1]}}, "has column(s) ['extra'] that the first file lacks"),
    ],
)
def test_every_kind_of_drift_is_refused(tmp_path, second, says):
    _write(tmp_path / "in" / "a.parquet", image=[b"png"], policy=["p"])
    table = pa.table(
        {"id": ["b-0"], "question": ["Q?"], "responses": [["a"]], "image": [b"x"], "policy": ["p"]}
    )
    if "drop" in second:
        table = table.drop_columns([second["drop"]])
    for name, values in second.get("set", {}).items():
        column = pa.array(values)
        table = (
            table.set_column(table.column_names.index(name), name, column)
            if name in table.column_names
            else table.append_column(name, column)
        )
    pq.write_table(table, tmp_path / "in" / "b.parquet")
    with pytest.raises(InputSchemaError, match=r"b\.parquet") as info:
        plan_read(_config(tmp_path / "in"))
    assert says in str(info.value)


def test_variants_of_one_type_are_the_same_column(tmp_path):
    """large_string (polars), an all-null column (a writer that could not infer it): accepted and
    read in the first file's types."""
    _write(tmp_path / "in" / "a.parquet", image=[b"png"], policy=["p"])
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["b-0"], pa.large_string()),
                "question": pa.array(["Q?"], pa.large_string()),
                "responses": pa.array([["x"]], pa.large_list(pa.large_string())),
                "image": pa.array([None], pa.null()),
                "policy": ["p"],
            }
        ),
        tmp_path / "in" / "b.parquet",
    )
    plan = plan_read(_config(tmp_path / "in"))
    assert plan.schema.field("question").type == pa.string()
    assert plan.schema.field("responses").type == pa.list_(pa.string())
    assert len(plan.files) == 2 and plan.num_rows == 2


def test_every_footer_is_read_and_paths_are_relative_to_the_input_root(tmp_path):
    _write(tmp_path / "in" / "day1" / "a.parquet", image=[b"png", b"png"])
    _write(tmp_path / "in" / "day2" / "a.parquet", image=[b"png"])
    plan = plan_read(_config(tmp_path / "in"))
    assert [f.relpath for f in plan.files] == ["day1/a.parquet", "day2/a.parquet"]
    assert [f.num_rows for f in plan.files] == [2, 1]
    assert dict(plan.files[0].column_bytes)["image"] > 0
    # Summed over the files, from the footers alone: what output files are sized from.
    sizes = plan.column_sizes()
    assert sizes["image"] == sum(dict(f.column_bytes)["image"] for f in plan.files)
    assert set(sizes) == {"id", "question", "responses", "image"}
    assert relative_names("s3://b/in/*.parquet", ["s3://b/in/x.parquet"]) == ["x.parquet"]
    assert relative_names("s3://b/in/x.parquet", ["s3://b/in/x.parquet"]) == ["x.parquet"]
    assert relative_names("s3://b/in/", ["s3://b/in/d/x.parquet"]) == ["d/x.parquet"]


def test_flat_candidate_index_column_is_configurable_and_never_passed_through(tmp_path):
    rows = {
        "id": ["g", "g"],
        "question": ["Q?"] * 2,
        "response": ["a", "b"],
        "order": [1, 0],
        "candidate_index": [5, 6],
    }
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "in" / "a.parquet")
    plan = plan_read(_config(tmp_path / "in"))
    assert plan.layout == "flat" and plan.candidate_index_column == "candidate_index"
    assert [f.name for f in plan.passthrough] == [
        "question",
        "order",
    ]  # the question passes through by default
    plan = plan_read(_config(tmp_path / "in", "input.candidate_index_column=order", "input.passthrough=[]"))
    assert plan.candidate_index_column == "order"
    # Not the candidate index any more, but still the output's own column name: never copied over it.
    with pytest.raises(InputSchemaError, match=r"\['candidate_index'\] would be passed through"):
        plan_read(_config(tmp_path / "in", "input.candidate_index_column=order"))
    plan = plan_read(
        _config(tmp_path / "in", "input.candidate_index_column=null", "input.passthrough=[order]")
    )
    assert plan.candidate_index_column is None and [f.name for f in plan.passthrough] == ["question", "order"]
