"""The prepare stage on its own: data problems become typed error rows, our bugs stay loud."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from visualprm_ray.job import stages as col
from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.stages import prepare as prepare_module
from visualprm_ray.job.stages.prepare import PrepareStage


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path_factory.mktemp("model"), seed=0)
    config = JobConfig.from_sources(
        None, ["images.max_tiles=1"], input_uri="/in", output_uri="/out", model_source=str(model)
    )
    return PrepareStage(config, str(model))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    return buf.getvalue()


def _row(**overrides):
    row = {col.QUESTION: "What is shown?", col.IMAGE: _png(), col.RESPONSES: ["It is white.\n\nSo: white."]}
    row.update(overrides)
    return row


def test_a_good_row_is_prepared(stage):
    out = stage.prepare_row(_row())
    assert out[col.GROUP_ERROR] is None and out[col.CANDIDATE_ERROR] == [None]
    assert out[col.NUM_TILES] == 1 and out[col.NUM_STEPS] == [2] and out[col.TRUNCATED] == [False]


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ({col.QUESTION: 42}, "invalid_question"),  # a typed column cannot hold it; a dict row can
        ({col.QUESTION: None}, "invalid_question"),
        ({col.IMAGE: [_png(), None]}, "image_missing"),
        ({col.IMAGE: 3.5}, "image_unsupported"),
        ({col.RESPONSES: None}, "no_candidates"),
    ],
)
def test_group_problems_are_typed_row_errors(stage, overrides, kind):
    out = stage.prepare_row(_row(**overrides))
    assert out[col.GROUP_ERROR_KIND] == kind and out[col.GROUP_ERROR_STAGE] == "prepare"
    assert out[col.GROUP_ERROR]


def test_candidate_problems_stay_with_the_candidate(stage):
    out = stage.prepare_row(_row(**{col.RESPONSES: ["fine.\n\nyes.", 7, None]}))
    assert out[col.GROUP_ERROR] is None
    assert out[col.CANDIDATE_ERROR_KIND] == [None, "invalid_response", "invalid_response"]
    assert "got int" in out[col.CANDIDATE_ERROR][1] and "null" in out[col.CANDIDATE_ERROR][2]


def test_a_bug_in_our_code_is_not_a_row_error(stage, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(prepare_module, "prepare_group", broken)
    with pytest.raises(KeyError, match="a bug of ours"):
        stage.prepare_row(_row())
