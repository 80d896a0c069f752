"""The driver's reading of output files: 64-bit keys, exact membership, and per-file summaries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job import outputs
from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.outputs import (
    exact_isin,
    key_hashes,
    repeated_keys,
    string_hashes,
    summarize_outputs,
)
from visualprm_ray.storage import TornFile

MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _reference_hash(text: str | None) -> int:
    """The documented hash, the slow way: sum of (byte + 1) * P**i, length folded in, mixed."""
    data = (text or "").encode()
    total = sum((b + 1) * pow(outputs._MULTIPLIER, i, 1 << 64) for i, b in enumerate(data)) & MASK
    return _mix(total ^ ((len(data) * outputs._GOLDEN) & MASK))


def test_string_hashes_match_the_reference_across_chunks_slices_and_nulls():
    values = [f"id-{i}" * (i % 7) for i in range(outputs._CHUNK_ROWS * 2 + 5)] + [None, "é∑", ""]
    array = pa.array(values)
    got = string_hashes(array)
    assert got.dtype == np.uint64
    assert got.tolist() == [_reference_hash(v) for v in values]
    # A slice (non-zero offset) and a chunk boundary give the same hashes as the whole.
    assert string_hashes(array.slice(3, 100)).tolist() == got[3:103].tolist()
    assert len(set(got.tolist())) == len(set(values) - {None})  # null hashes as "", which is there


def test_key_hashes_tell_candidates_of_one_group_apart():
    ids = pa.array(["g"] * 4 + ["h"] * 4)
    keys = key_hashes(ids, pa.array([0, 1, 2, 3] * 2, pa.int32()))
    assert len(set(keys.tolist())) == 8
    assert key_hashes(ids).tolist() == string_hashes(ids).tolist()


def test_repeated_keys_are_the_values_seen_more_than_once():
    keys = np.array([5, 1, 5, 3, 1, 1, 9], np.uint64)
    assert repeated_keys(keys).tolist() == [1, 5]
    assert repeated_keys(np.array([2, 1], np.uint64)).tolist() == []
    assert repeated_keys(np.zeros(0, np.uint64)).tolist() == []


@pytest.mark.parametrize("weak", [False, True])
def test_exact_isin_equals_a_set_lookup_even_when_hashes_collide(monkeypatch, weak):
    rng = np.random.default_rng(0)
    pool = [f"g{n}" for n in rng.choice(5000, 700, replace=False)]
    values = [f"g{n}" for n in rng.integers(0, 5000, 3000)] + ["", "g"]
    if weak:  # every string of one length collides: the string comparison alone must decide
        real = outputs.string_hashes
        monkeypatch.setattr(
            outputs, "string_hashes", lambda a: real(pa.compute.utf8_length(a).cast(pa.string()))
        )
    got = exact_isin(pa.array(values), pa.array(pool))
    assert got.tolist() == [v in set(pool) for v in values]
    assert exact_isin(pa.array(values), pa.array([], pa.string())).tolist() == [False] * len(values)


def _output(path, ids, candidates):
    from visualprm_ray.schema import output_schema

    schema = output_schema([])
    n = len(ids)
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols["id"] = pa.array(ids)
    cols["candidate_index"] = pa.array(candidates, pa.int32())
    cols["error"] = pa.array([None if c != 1 else "bad_image: no" for c in candidates])
    cols["error_kind"] = pa.array([None if c != 1 else "bad_image" for c in candidates])
    cols["error_stage"] = pa.array([None if c != 1 else "prepare" for c in candidates])
    pq.write_table(pa.table(cols, schema=schema), path)


def test_summaries_in_listing_order_with_torn_files(tmp_path):
    config = JobConfig.from_sources(
        None, [], input_uri=str(tmp_path / "in"), output_uri=str(tmp_path), model_source="m"
    )
    _output(tmp_path / "a.parquet", ["a", "a", "e"], [0, 1, None])
    (tmp_path / "b.parquet").write_bytes(b"PAR1 torn")
    _output(tmp_path / "c.parquet", ["c"], [0])
    listing = [
        (str(tmp_path / n), (tmp_path / n).stat().st_size, None)
        for n in ("a.parquet", "b.parquet", "c.parquet")
    ]
    a, b, c = summarize_outputs(config, listing, torn="none")
    assert b is None
    assert (a.rows, a.candidates, a.errored, a.by_kind, a.by_stage) == (
        3,
        2,
        1,
        {"bad_image": 1},
        {"prepare": 1},
    )
    assert sorted(a.ids.to_pylist()) == ["a", "e"]
    assert a.keys.tolist() == key_hashes(pa.array(["a", "a"]), pa.array([0, 1], pa.int32())).tolist()
    assert (c.rows, c.candidates, c.errored) == (1, 1, 0)
    with pytest.raises(TornFile):
        list(summarize_outputs(config, listing, torn="raise"))
