"""The composer's block sizing (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.pipeline import rows_per_block


@pytest.mark.parametrize(
    ("overrides", "layout", "rows", "expected"),
    [
        ([], "grouped", 1000, 8),  # one batch of groups per block by default
        (["runtime.groups_per_batch=3"], "grouped", 1000, 3),
        (["input.num_blocks=4"], "grouped", 20, 5),  # spread over about that many blocks
        (["input.num_blocks=2"], "grouped", 1000, 32),  # but never more than 4 batches each
        (["input.num_blocks=1000"], "grouped", 10, 1),
        ([], "flat", 1000, 8),  # a flat input is read as its regrouped group rows
    ],
)
def test_rows_per_block(overrides, layout, rows, expected):
    config = JobConfig.from_sources(None, overrides, input_uri="/in", output_uri="/out", model_source="/m")

    plan = SimpleNamespace(layout=layout)  # only the layout matters here
    assert rows_per_block(config, plan, rows) == expected
