"""Tests for visualprm_ray.sample_data: the demo/integration dataset and its Parquet shards."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visualprm_ray.model.prompt import split_steps
from visualprm_ray.sample_data import (
    IMAGE_MODES,
    KINDS,
    SIZES,
    draw_geometry_figure,
    flat_rows,
    make_groups,
    write_shards,
)

N_GROUPS = 12
CANDIDATES = 4
BOXED = re.compile(r"Final answer: \\boxed\{(.*)\}$")

IMAGE_TYPES = {
    "bytes": pa.binary(),
    "hf_struct": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    "path": pa.string(),
    "relative_path": pa.string(),
    "list": pa.list_(pa.binary()),
    "none": pa.binary(),
    "mixed": pa.binary(),
}


def expected_schema(layout: str, image_mode: str) -> pa.Schema:
    image = IMAGE_TYPES[image_mode]
    if layout == "grouped":
        columns = [
            ("id", pa.string()),
            ("question", pa.string()),
            ("image", image),
            ("responses", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("policy", pa.string()),
            ("subject", pa.string()),
        ]
    else:
        columns = [
            ("id", pa.string()),
            ("question", pa.string()),
            ("image", image),
            ("response", pa.string()),
            ("candidate_index", pa.int32()),
            ("answer", pa.string()),
            ("policy", pa.string()),
            ("subject", pa.string()),
        ]
    return pa.schema(columns)


@pytest.fixture(scope="module")
def groups() -> list[dict]:
    return make_groups(N_GROUPS, CANDIDATES, seed=0)


def read_all(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# ----------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------
def test_deterministic_for_a_seed(groups):
    assert make_groups(N_GROUPS, CANDIDATES, seed=0) == groups
    other = make_groups(N_GROUPS, CANDIDATES, seed=1)
    assert [g["responses"] for g in other] != [g["responses"] for g in groups]
    # group i does not depend on how many groups are asked for
    assert make_groups(3, CANDIDATES, seed=0) == groups[:3]


def test_figures_are_deterministic_and_drawn_for_every_kind():
    for kind in KINDS:
        first = draw_geometry_figure(kind, 5, (640, 480))
        again = draw_geometry_figure(kind, 5, (640, 480))
        assert first.size == (640, 480)
        assert first.tobytes() == again.tobytes()
        pixels = np.asarray(first.convert("L"))
        assert (pixels == 255).mean() > 0.8, f"{kind}: background is not mostly white"
        assert (pixels < 128).sum() > 500, f"{kind}: hardly anything is drawn"
    with pytest.raises(ValueError, match="unknown figure kind"):
        draw_geometry_figure("hexagon", 0, (640, 480))


def test_group_fields(groups):
    ids = [g["id"] for g in groups]
    assert ids == [f"geo-{i:05d}" for i in range(N_GROUPS)]
    for g in groups:
        assert set(g) == {"id", "question", "answer", "image", "responses", "policy", "subject"}
        assert g["subject"] == "geometry"
        assert g["policy"] in {"policy-a", "policy-b"}
        assert len(g["responses"]) == CANDIDATES
        assert all(isinstance(r, str) and r for r in g["responses"])
        assert re.search(r"\d", g["question"]), g["question"]
        assert g["question"].endswith("?") or g["question"].endswith("\\pi.")
        assert "<image>" not in g["question"]
    assert {g["policy"] for g in groups} == {"policy-a", "policy-b"}


def test_images_decode_with_varied_sizes(groups):
    sizes = []
    for g in groups:
        image = decode(g["image"])
        assert image.format == "PNG"
        sizes.append(image.size)
    assert set(sizes) <= set(SIZES)
    assert set(sizes) == set(SIZES)  # 12 groups cycle through all six sizes
    assert len({g["image"] for g in groups}) == N_GROUPS


def test_responses_correct_and_wrong(groups):
    n_correct = n_wrong = 0
    for g in groups:
        correct_here = wrong_here = 0
        for response in g["responses"]:
            match = BOXED.search(response)
            assert match, f"no final boxed answer at the end of {response!r}"
            if match.group(1) == g["answer"]:
                assert response.endswith(f"Final answer: \\boxed{{{g['answer']}}}")
                correct_here += 1
            else:
                wrong_here += 1
        assert correct_here >= 1, g["id"]
        assert wrong_here >= 1, g["id"]
        n_correct += correct_here
        n_wrong += wrong_here
    assert n_correct + n_wrong == N_GROUPS * CANDIDATES


def test_step_counts(groups):
    counts = [len(r.split("\n\n")) for g in groups for r in g["responses"]]
    long = [c for c in counts if c >= 14]
    assert long, "no response long enough to exercise step merging"
    assert all(c <= 18 for c in long)
    short = [c for c in counts if c < 14]
    assert min(short) == 1 and max(short) <= 8
    assert len(set(short)) >= 4, f"step counts are not mixed: {sorted(set(short))}"
    # the long ones really are merged by VisualPRM's step splitting
    response = next(r for g in groups for r in g["responses"] if len(r.split("\n\n")) >= 14)
    assert len(split_steps(response, 12)) < len(response.split("\n\n"))


def test_long_response_whenever_eight_groups():
    for seed in range(4):
        groups = make_groups(8, 2, seed=seed)
        assert any(len(r.split("\n\n")) >= 14 for g in groups for r in g["responses"]), seed


def test_single_candidate_is_correct():
    for g in make_groups(4, 1, seed=3):
        assert g["responses"][0].endswith(f"\\boxed{{{g['answer']}}}")


def test_flat_rows(groups):
    rows = flat_rows(groups)
    assert len(rows) == N_GROUPS * CANDIDATES
    for i, g in enumerate(groups):
        mine = rows[i * CANDIDATES : (i + 1) * CANDIDATES]
        assert [r["candidate_index"] for r in mine] == list(range(CANDIDATES))
        assert [r["response"] for r in mine] == g["responses"]
        assert all(r["id"] == g["id"] and r["image"] is g["image"] for r in mine)


# ----------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["grouped", "flat"])
@pytest.mark.parametrize("image_mode", IMAGE_MODES)
def test_every_mode_writes_the_documented_schema(tmp_path, groups, layout, image_mode):
    images_dir = tmp_path / "images" if image_mode in ("path", "relative_path") else None
    paths = write_shards(
        tmp_path / "shards", groups, 3, layout=layout, image_mode=image_mode, images_dir=images_dir
    )
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for p in paths:
        assert pq.read_schema(p).remove_metadata().equals(expected_schema(layout, image_mode))
    table = read_all(paths)
    assert table.schema.equals(expected_schema(layout, image_mode))
    per_group = 1 if layout == "grouped" else CANDIDATES
    assert table.num_rows == N_GROUPS * per_group

    images = table.column("image").to_pylist()
    by_group = images[::per_group]  # one image value per group
    if layout == "flat":  # every candidate row of a group carries the same image
        for i in range(N_GROUPS):
            assert all(v == by_group[i] for v in images[i * per_group : (i + 1) * per_group])

    if image_mode == "bytes":
        assert by_group == [g["image"] for g in groups]
    elif image_mode == "hf_struct":
        assert [v["bytes"] for v in by_group] == [g["image"] for g in groups]
        paths_in = [v["path"] for v in by_group]
        assert None in paths_in
        assert f"{groups[0]['id']}.png" in paths_in
    elif image_mode == "path":
        for value, g in zip(by_group, groups, strict=True):
            assert Path(value).is_absolute()
            assert Path(value).read_bytes() == g["image"]
    elif image_mode == "relative_path":
        for value, g in zip(by_group, groups, strict=True):
            assert not Path(value).is_absolute()
            assert (images_dir / value).read_bytes() == g["image"]
    elif image_mode == "list":
        assert all(1 <= len(v) <= 2 for v in by_group)
        assert {len(v) for v in by_group} == {1, 2}
        questions = table.column("question").to_pylist()[::per_group]
        for value, question, g in zip(by_group, questions, groups, strict=True):
            assert value[0] == g["image"]
            if len(value) == 2:
                assert value[1] != value[0]
                decode(value[1])
                assert "two figures" in question and question.endswith(g["question"])
            else:
                assert question == g["question"]
    elif image_mode == "none":
        assert table.column("image").null_count == table.num_rows
        assert table.column("question").to_pylist()[::per_group] == [g["question"] for g in groups]
    elif image_mode == "mixed":
        assert 0 < table.column("image").null_count < table.num_rows
        assert all(v is None or v == g["image"] for v, g in zip(by_group, groups, strict=True))


def test_shards_split_evenly_and_keep_order(tmp_path, groups):
    paths = write_shards(tmp_path, groups, 5)
    counts = [pq.read_metadata(p).num_rows for p in paths]
    assert counts == [3, 3, 2, 2, 2]
    assert read_all(paths).column("id").to_pylist() == [g["id"] for g in groups]
    table = read_all(paths)
    assert table.column("responses").to_pylist() == [g["responses"] for g in groups]
    assert table.column("answer").to_pylist() == [g["answer"] for g in groups]


def test_flat_shards_keep_groups_whole(tmp_path, groups):
    paths = write_shards(tmp_path, groups, 5, layout="flat")
    assert [pq.read_metadata(p).num_rows for p in paths] == [c * CANDIDATES for c in (3, 3, 2, 2, 2)]
    seen: set[str] = set()
    for p in paths:
        table = pq.read_table(p)
        ids = table.column("id").to_pylist()
        assert not seen & set(ids), "a group is split across shards"
        seen |= set(ids)
        for start in range(0, len(ids), CANDIDATES):
            assert len(set(ids[start : start + CANDIDATES])) == 1
            indices = table.column("candidate_index").to_pylist()[start : start + CANDIDATES]
            assert indices == list(range(CANDIDATES))
    assert read_all(paths).to_pylist() == flat_rows(groups)


def test_more_shards_than_groups(tmp_path):
    few = make_groups(2, 2, seed=0)
    paths = write_shards(tmp_path, few, 4)
    assert [pq.read_metadata(p).num_rows for p in paths] == [1, 1, 0, 0]
    assert pq.read_table(paths[3]).schema.equals(expected_schema("grouped", "bytes"))


def test_written_bytes_are_deterministic(tmp_path, groups):
    a = write_shards(tmp_path / "a", groups, 2, layout="flat", image_mode="list")
    b = write_shards(
        tmp_path / "b", make_groups(N_GROUPS, CANDIDATES, seed=0), 2, layout="flat", image_mode="list"
    )
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_bad_arguments(tmp_path, groups):
    with pytest.raises(ValueError, match="images_dir"):
        write_shards(tmp_path, groups, 1, image_mode="path")
    with pytest.raises(ValueError, match="image_mode"):
        write_shards(tmp_path, groups, 1, image_mode="url")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layout"):
        write_shards(tmp_path, groups, 1, layout="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_shards"):
        write_shards(tmp_path, groups, 0)
