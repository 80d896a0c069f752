"""``visualprm-ray export`` on a real local Ray: each format loaded with the real ``datasets`` and
checked with TRL's own helpers, row by row against the scores table, images against the input's."""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.export import ExportConfig, ExportError, run_export
from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import run_job
from visualprm_ray.model.prompt import split_steps
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

MAX_STEPS = 3


def _score(root, model, layout: str, *extra: str):
    groups = make_groups(7, candidates=3, seed=4)
    groups[2]["image"] = b"not an image"  # the whole group errors (image_undecodable)
    groups[4]["responses"][1] = ""  # one candidate errors
    write_shards(root / "in", groups, 2, layout=layout)
    config = JobConfig.from_sources(
        None,
        ["model.dtype=float32", f"scoring.max_steps={MAX_STEPS}", "output.min_rows_per_file=5", *extra],
        input_uri=str(root / "in"),
        output_uri=str(root / "scores"),
        model_source=str(model),
    )
    run_job(config, emit=lambda *_: None)
    return {g["id"]: g for g in groups}


@pytest.fixture(scope="module", params=["grouped", "flat"])
def scored(request, ray_local, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    groups = _score(root, tiny_model, request.param)
    table = pd.read_parquet(root / "scores")
    return root, groups, table


def _export(root, fmt: str, *extra: str, name: str | None = None):
    config = ExportConfig.from_sources(
        None,
        ["output.rows_per_file=3", *extra],
        scores_uri=str(root / "scores"),
        export_format=fmt,
        output_uri=str(root / (name or f"out-{fmt}")),
    )
    return run_export(config, emit=lambda *_: None), root / (name or f"out-{fmt}")


def _load(out):
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(out), split="train")


def _same_image(pil, png_bytes: bytes) -> bool:
    from PIL import Image

    return (
        pil.tobytes() == Image.open(io.BytesIO(png_bytes)).tobytes()
        and pil.size == Image.open(io.BytesIO(png_bytes)).size
    )


def test_dpo_pairs_are_the_best_and_the_lowest_of_each_qualifying_group(scored):
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    root, groups, table = scored
    record, out = _export(root, "dpo")
    ds = _load(out)
    scoredonly = table[table["error"].isna()]
    expected = {}
    for gid, rows in scoredonly.groupby("id"):
        if len(rows) < 2:
            continue
        best = rows[rows["is_best"]].iloc[0]
        low = rows.sort_values("rank").iloc[-1]
        expected[gid] = (int(best["candidate_index"]), int(low["candidate_index"]))
    assert sorted(ds["id"]) == sorted(expected)
    assert len(ds) == record["rows"] == record["groups_exported"] == len(expected)
    assert record["groups"] == 7 and record["groups_skipped"] == {"no_scored_candidate": 1}
    for row in ds:
        g = groups[row["id"]]
        chosen, rejected = expected[row["id"]]
        assert (row["chosen_index"], row["rejected_index"]) == (chosen, rejected)
        assert row["chosen"] == [
            {"role": "assistant", "content": [{"type": "text", "text": g["responses"][chosen]}]}
        ]
        assert row["rejected"][0]["content"][0]["text"] == g["responses"][rejected]
        assert row["chosen_score"] >= row["rejected_score"]
        assert row["prompt"][0]["role"] == "user"
        assert row["prompt"][0]["content"] == [
            {"type": "image", "text": None},
            {"type": "text", "text": g["question"]},
        ]
        assert len(row["images"]) == 1 and _same_image(row["images"][0], g["image"])
        assert row["policy"] == g["policy"] and row["answer"] == g["answer"]
        # TRL's own view of the row: conversational, and its image block filled from `images`.
        assert is_conversational(row)
        filled = prepare_multimodal_messages(row["prompt"] + row["chosen"], row["images"])
        assert filled[0]["content"][0]["image"] is row["images"][0]
    card = (out / "README.md").read_text()
    assert (
        "preference" in card
        and f"| groups exported | {len(expected)} |" in card
        and "no_scored_candidate" in card
    )
    assert json.loads((out / "_export.json").read_text())["groups_skipped"] == {"no_scored_candidate": 1}
    assert (out / "_SUCCESS").exists()
    # Files written as datasets writes them: the features travel in the Parquet schema.
    meta = pq.read_schema(next(out.glob("train-*.parquet"))).metadata[b"huggingface"]
    assert json.loads(meta)["info"]["features"]["images"] == [{"_type": "Image"}]


def test_dpo_min_margin_leaves_out_the_close_pairs_and_counts_them(scored):
    root, _, table = scored
    margins = (
        table[table["error"].isna()]
        .groupby("id")["score"]
        .agg(lambda s: s.max() - s.min() if len(s) > 1 else None)
    ).dropna()
    cut = float(margins.median())
    record, out = _export(root, "dpo", f"export.min_margin={cut}", name="out-dpo-margin")
    kept = sorted(margins[margins >= cut].index)
    assert sorted(_load(out)["id"]) == kept
    assert record["groups_skipped"]["below_min_margin"] == int((margins < cut).sum())


def test_sft_is_the_best_candidate_over_min_score(scored):
    from trl.data_utils import is_conversational

    root, groups, table = scored
    best = table[table["is_best"].fillna(False).astype(bool)]
    floor = float(best["score"].median())
    record, out = _export(root, "sft", f"export.min_score={floor}")
    ds = _load(out)
    expected = best[best["score"] >= floor]
    assert sorted(ds["id"]) == sorted(expected["id"])
    assert record["groups_skipped"]["below_min_score"] == int((best["score"] < floor).sum())
    for row in ds:
        want = expected[expected["id"] == row["id"]].iloc[0]
        assert row["candidate_index"] == want["candidate_index"]
        assert (
            row["completion"][0]["content"][0]["text"]
            == groups[row["id"]]["responses"][row["candidate_index"]]
        )
        assert row["score"] == pytest.approx(want["score"])
        assert is_conversational(row)
        assert _same_image(row["images"][0], groups[row["id"]]["image"])


def test_prm_rows_are_every_scored_candidate_with_its_step_labels(scored):
    from trl.data_utils import is_conversational

    root, groups, table = scored
    record, out = _export(root, "prm", "export.threshold=0.05")
    ds = _load(out)
    scoredonly = table[table["error"].isna()]
    got = {(r["id"], r["candidate_index"]): r for r in ds}
    assert set(got) == {
        (i, int(c)) for i, c in zip(scoredonly["id"], scoredonly["candidate_index"], strict=True)
    }
    assert record["rows"] == len(scoredonly)  # the errored candidate and group never appear
    for _, want in scoredonly.iterrows():
        row = got[(want["id"], int(want["candidate_index"]))]
        response = groups[want["id"]]["responses"][int(want["candidate_index"])]
        assert row["completions"] == split_steps(response, MAX_STEPS)
        assert row["step_scores"] == pytest.approx(list(want["step_scores"]))
        assert row["labels"] == [s > 0.05 for s in want["step_scores"]]
        assert row["prompt"] == groups[want["id"]]["question"]
        assert not is_conversational(row)  # TRL's stepwise supervision is the standard form
        assert _same_image(row["images"][0], groups[want["id"]]["image"])


def test_an_unfinished_or_changed_scores_output_is_refused(scored, tmp_path):
    root, _, _ = scored
    (root / "scores" / "_SUCCESS").rename(tmp_path / "_SUCCESS")
    try:
        with pytest.raises(ExportError, match="has no _SUCCESS"):
            _export(root, "sft", name="out-refused")
        record, _ = _export(root, "sft", "scores.allow_incomplete=true", name="out-incomplete")
        assert record["scores_status"] == "complete"
    finally:
        (tmp_path / "_SUCCESS").rename(root / "scores" / "_SUCCESS")
    with pytest.raises(ExportError, match="already holds files"):
        _export(root, "sft", name="out-incomplete")
    with pytest.raises(ExportError, match="is in the input"):
        _export(root, "sft", name="in/exported")
    assert not (root / "in" / "exported").exists()


def test_the_command_line_and_a_changed_input(scored, capsys):
    root, _, _ = scored
    args = ["export", str(root / "scores"), "--format", "sft", "--to", str(root / "out-cli")]
    assert main([*args, "--set", "output.rows_per_file=2"]) == 0
    assert len(_load(root / "out-cli")) == 6
    # A new file under the input: the manifest's input is no longer what was scored.
    extra = root / "in" / "part-zz.parquet"
    pq.write_table(pq.read_table(next((root / "in").glob("*.parquet"))), extra)
    try:
        assert main([*args[:-1], str(root / "out-cli-2")]) == 2
        assert "changed since it was scored" in capsys.readouterr().err
        # Named explicitly, the input is taken as it is now (a group's first row in input order).
        assert main([*args[:-1], str(root / "out-cli-3"), "--input", str(root / "in")]) == 0
    finally:
        extra.unlink()


def test_paths_and_images_root_on_the_loopback_s3_server(ray_local, s3_env, tiny_model, tmp_path):
    """Scores, input and images on S3 (images referenced by relative path under images.root), the
    dataset written to S3 and loaded from there with datasets."""
    import s3fs

    fs = s3fs.S3FileSystem()
    groups = make_groups(4, candidates=2, seed=9)
    write_shards(tmp_path / "in", groups, 2, image_mode="relative_path", images_dir=tmp_path / "images")
    base = f"s3://{s3_env}"
    fs.put(str(tmp_path / "in"), f"{base}/in", recursive=True)
    fs.put(str(tmp_path / "images"), f"{base}/images", recursive=True)
    run_job(
        JobConfig.from_sources(
            None,
            ["model.dtype=float32", f"images.root={base}/images"],
            input_uri=f"{base}/in",
            output_uri=f"{base}/scores",
            model_source=str(tiny_model),
        ),
        emit=lambda *_: None,
    )
    record = run_export(
        ExportConfig.from_sources(
            None, [], scores_uri=f"{base}/scores", export_format="dpo", output_uri=f"{base}/dpo"
        ),
        emit=lambda *_: None,
    )
    local = tmp_path / "dpo"
    fs.get(f"{base}/dpo", str(local), recursive=True)
    ds = _load(local)
    assert len(ds) == record["rows"] == 4
    by_id = {g["id"]: g for g in groups}
    for row in ds:
        assert _same_image(row["images"][0], by_id[row["id"]]["image"])
        assert row["images"][0].format == "PNG"
    assert fs.exists(f"{base}/dpo/_SUCCESS") and fs.exists(f"{base}/dpo/README.md")


def test_an_export_where_no_group_qualifies_is_refused_with_its_counts(scored):
    """datasets cannot load a split without rows: nothing to train on is said, with the counts."""
    root, _, _ = scored
    with pytest.raises(ExportError, match=r"no group of 7 qualified \(skipped: below_min_score 6, no_scored"):
        _export(root, "sft", "export.min_score=2", name="out-empty")
    out = root / "out-empty"
    assert json.loads((out / "_export.json").read_text())["groups_skipped"]["below_min_score"] == 6
    assert not (out / "_SUCCESS").exists() and not list(out.glob("*.parquet"))
