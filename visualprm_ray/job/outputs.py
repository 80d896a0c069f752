"""The job's output files as the driver's bookkeeping reads them (resume, the count check).

Each file is read once per attempt, its key and error columns only (many files at once), and
reduced as it arrives, in the caller's thread, to an :class:`OutputSummary`: counts, and one 64-bit key per candidate row instead of an id
string (at 10M candidates ~80 MB rather than gigabytes of Python strings). Callers look at the rows
behind equal keys again before reporting anything, so a hash collision can cost a re-read, never a
wrong count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from visualprm_ray.job.config import JobConfig

# Files read at once when their data (not only their footers) is read: each read holds one file's
# columns until the caller has reduced them, so this bounds the driver's memory as well as its
# round trips.
DATA_THREADS = 32


_MULTIPLIER = 0x100000001B3  # FNV-1a's 64-bit prime: odd, so every power is a distinct unit mod 2**64
_GOLDEN = 0x9E3779B97F4A7C15
# Rows hashed at a time. Small on purpose: each scanning thread's temporaries (~6 uint64 per byte
# of ids) are freed to the C allocator's per-thread arena, which keeps them; at 32k rows that was
# ~20 MB per thread, a third of the driver's peak.
_CHUNK_ROWS = 1 << 12


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves about half of the output bits."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def string_hashes(values: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string, computed on the Arrow buffers (no Python object per row).

    A polynomial over each string's bytes (byte ``i`` weighted by ``P**i`` mod 2**64), its length
    folded in, then mixed. Null strings hash like empty ones (ids are never null in an output).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(values) > _CHUNK_ROWS:  # bounded temporaries: a few MB whatever the file's size
        return np.concatenate(
            [string_hashes(values.slice(i, _CHUNK_ROWS)) for i in range(0, len(values), _CHUNK_ROWS)]
        )
    values = pc.fill_null(values.cast(pa.large_string()), "")
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(values.buffers()[1], np.int64, n + 1, values.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(values.buffers()[2], np.uint8, end - start, start).astype(np.uint64)
    lengths = np.diff(offsets)
    position = np.arange(end - start, dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)
    longest = int(lengths.max())
    with np.errstate(over="ignore"):
        # P**0 .. P**(longest - 1), wrapping mod 2**64 as unsigned arithmetic does.
        powers = np.cumprod(
            np.concatenate([[np.uint64(1)], np.full(max(longest - 1, 0), _MULTIPLIER, np.uint64)])
        )
        weighted = (data + np.uint64(1)) * powers[position]
        sums = np.zeros(n, np.uint64)
        nonempty = lengths > 0
        if weighted.size:
            sums[nonempty] = np.add.reduceat(weighted, (offsets[:-1] - start)[nonempty])
        return _mix(sums ^ (lengths.astype(np.uint64) * np.uint64(_GOLDEN)))


def key_hashes(ids: pa.Array, candidate_index: pa.Array | None = None) -> np.ndarray:
    """A 64-bit key per row: the id's hash, mixed with the candidate index when given.

    What the driver keeps per output row: 8 bytes instead of an id string, so the exactly-once
    check of 10M candidates holds ~80 MB. Equal keys are checked again on the strings themselves
    before anything is reported, so a hash collision can never pass for a duplicate.
    """
    import numpy as np

    hashed = string_hashes(ids)
    if candidate_index is None:
        return hashed
    index = candidate_index.to_numpy(zero_copy_only=False).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix(hashed ^ (index * np.uint64(_GOLDEN) + np.uint64(0x632BE59BD9B4E019)))


def repeated_keys(keys: np.ndarray) -> np.ndarray:
    """The distinct values that occur more than once in ``keys``, which is sorted in place.

    In place and without ``np.unique``'s index and count arrays: at 10M keys the check needs the
    80 MB of keys and a 10 MB mask, not four more arrays of their size.
    """
    import numpy as np

    keys.sort()
    again = keys[1:] == keys[:-1]
    return np.unique(keys[1:][again])


def exact_isin(values: pa.Array, pool: pa.Array) -> np.ndarray:
    """``values[i] in pool`` for each string, exact, holding 8 bytes per string of ``pool``.

    ``pc.is_in`` builds a hash table of ``pool``'s strings (at 12.5M group ids, gigabytes); here both
    sides are hashed to 64 bits, ``pool``'s hashes sorted, and every hash hit compared as strings
    with each pool string of that hash, so a collision never counts as a match.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    out = np.zeros(len(values), bool)
    if not len(values) or not len(pool):
        return out
    pool_hashes = string_hashes(pool)
    order = np.argsort(pool_hashes, kind="stable")
    pool_hashes = pool_hashes[order]
    hashes = string_hashes(values)
    at = np.minimum(np.searchsorted(pool_hashes, hashes), len(pool_hashes) - 1)
    hit = np.flatnonzero(pool_hashes[at] == hashes)
    if not len(hit):
        return out
    first = values.take(pa.array(hit))
    same = pc.equal(first, pool.take(pa.array(order[at[hit]])))
    same = np.asarray(pc.fill_null(same, False).to_numpy(zero_copy_only=False), bool)
    out[hit[same]] = True
    unsure = hit[~same]
    if len(unsure):  # a collision, or a hash that more than one pool string has: compare with all
        shared = order[np.isin(pool_hashes, hashes[unsure])]
        found = pc.is_in(values.take(pa.array(unsure)), value_set=pool.take(pa.array(shared)))
        out[unsure] = np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False), bool)
    return out


@dataclass
class OutputSummary:
    """One output file reduced to what the bookkeeping needs: counts, and a key per candidate row."""

    rows: int
    candidates: int
    errored: int
    by_stage: dict[str, int]
    by_kind: dict[str, int]
    # np.ndarray of uint64, one per candidate row (key_hashes); None once the count check took them.
    keys: Any
    # The file's distinct group ids (Arrow strings), for resume; None once resume collected them.
    ids: Any


OUTPUT_KEY_COLUMNS = ["id", "candidate_index", "error", "error_kind", "error_stage"]


def read_output_keys(config: JobConfig, uri: str, size: int | None) -> pa.Table:
    """One output file's key and error columns (their chunks alone): the I/O half of a summary.

    Raises :class:`visualprm_ray.storage.TornFile` for a file that is not complete Parquet.
    """
    from visualprm_ray.storage import read_parquet

    return read_parquet(uri, OUTPUT_KEY_COLUMNS, config.storage, size=size)


def summarize_keys(table: pa.Table) -> OutputSummary:
    """Reduce one output file's key and error columns to its :class:`OutputSummary`."""
    import pyarrow.compute as pc

    candidates = table.filter(pc.is_valid(table["candidate_index"]))
    errored = candidates.filter(pc.is_valid(candidates["error"]))
    by_stage = pc.value_counts(errored["error_stage"]).to_pylist() if len(errored) else []
    by_kind = pc.value_counts(errored["error_kind"]).to_pylist() if len(errored) else []
    return OutputSummary(
        rows=len(table),
        candidates=len(candidates),
        errored=len(errored),
        by_stage={v["values"]: v["counts"] for v in by_stage},
        by_kind={v["values"]: v["counts"] for v in by_kind},
        keys=key_hashes(candidates["id"].combine_chunks(), candidates["candidate_index"].combine_chunks()),
        ids=pc.unique(table["id"].combine_chunks()),
    )


def summarize_outputs(
    config: JobConfig, listing: list[tuple[str, int | None, str | None]], *, torn: Literal["raise", "none"]
) -> Iterator[OutputSummary | None]:
    """Each listed output file's summary, in order: read many at once, reduced in this thread.

    ``torn="none"`` yields None for a file that is not complete Parquet (resume deletes it);
    ``"raise"`` lets :class:`visualprm_ray.storage.TornFile` through.
    """
    from visualprm_ray.storage import TornFile, parallel_imap

    def read(i: int) -> pa.Table | None:
        uri, size, _ = listing[i]
        try:
            return read_output_keys(config, uri, size)
        except TornFile:
            if torn == "raise":
                raise
            return None

    for table in parallel_imap(read, len(listing), threads=DATA_THREADS):
        yield None if table is None else summarize_keys(table)
