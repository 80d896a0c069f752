"""Output file sizing: rows per file from a byte target and the input's bytes per candidate."""

from __future__ import annotations

import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.inputs import plan_read
from visualprm_ray.job.stages.write import rows_per_file


def _text(rng: random.Random, n: int) -> str:
    # Distinct values, as real responses are: a repeated one would be dictionary-encoded to nothing.
    return "".join(rng.choices(string.ascii_letters, k=n))


def _plan(tmp_path, overrides, *, text: int, layout: str = "grouped", passthrough: int = 0):
    (tmp_path / "in").mkdir(exist_ok=True)
    rng = random.Random(0)
    groups, candidates = 200, 4
    columns = {"id": [f"g{i}" for i in range(groups)], "question": ["q"] * groups}
    if layout == "grouped":
        columns["responses"] = [[_text(rng, text) for _ in range(candidates)] for _ in range(groups)]
    else:
        columns = {k: [v for v in vs for _ in range(candidates)] for k, vs in columns.items()}
        columns["response"] = [_text(rng, text) for _ in range(groups * candidates)]
    if passthrough:
        columns["source"] = [_text(rng, passthrough) for _ in columns["id"]]
    pq.write_table(pa.table(columns), tmp_path / "in" / "a.parquet", compression="zstd")
    config = JobConfig.from_sources(
        None, overrides, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_source="m"
    )
    return config, plan_read(config), groups * candidates


def test_rows_per_file_follow_the_byte_target(tmp_path):
    # 2,000 bytes of response text per candidate, ~200 of the rest: ~2.2 kB a row, uncompressed
    # (the estimate reads the footers' uncompressed sizes, not the zstd-compressed ones).
    config, plan, n = _plan(tmp_path, ["output.target_file_bytes=22000000"], text=2000)
    assert rows_per_file(config, plan, n) == pytest.approx(10_000, rel=0.05)


def test_a_groups_passthrough_counts_in_each_of_its_candidate_rows(tmp_path):
    config, plan, n = _plan(tmp_path, ["output.target_file_bytes=22000000"], text=1000, passthrough=4000)
    # 1,000 text + 4,000 passthrough (copied to each candidate row) + ~200: ~5.2 kB a row.
    assert rows_per_file(config, plan, n) == pytest.approx(22_000_000 / 5_200, rel=0.05)


def test_flat_rows_are_sized_by_their_own_response(tmp_path):
    config, plan, n = _plan(tmp_path, ["output.target_file_bytes=22000000"], text=2000, layout="flat")
    assert rows_per_file(config, plan, n) == pytest.approx(10_000, rel=0.05)


def test_small_targets_and_the_explicit_setting(tmp_path):
    config, plan, n = _plan(tmp_path, ["output.target_file_bytes=1024"], text=2000)
    assert rows_per_file(config, plan, n) == 1_000  # never tiny files from a byte target
    config, plan, n = _plan(tmp_path, ["output.min_rows_per_file=7"], text=2000)
    assert rows_per_file(config, plan, n) == 7  # what small jobs and tests use for many files
