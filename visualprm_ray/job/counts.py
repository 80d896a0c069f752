"""Candidates in and out, and the check that every input candidate came out exactly once.

What went in is counted from the input files alone, and what came out from the output files alone,
never from what the pipeline says it did: the check is independent of the code it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from visualprm_ray.job.inputs import ReadPlan
from visualprm_ray.job.resume import Committed

if TYPE_CHECKING:
    import pyarrow as pa

    from visualprm_ray.job.config import JobConfig


@dataclass
class Counts:
    """What went in and what came out; ``in == scored + errored + skipped`` or the job fails.

    ``scored``, ``errored`` and the breakdowns count candidate rows written by this attempt;
    ``skipped`` counts candidates committed by earlier attempts (resume). Groups without any
    candidate leave one error row each (``empty_groups``), outside the candidate equation.
    """

    groups_in: int = 0
    candidates_in: int = 0
    empty_groups: int = 0
    skipped: int = 0
    scored: int = 0
    errored: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0  # rows written by this attempt (candidate rows + empty-group rows)
    rows_total: int = 0  # rows in the output, earlier attempts included
    duplicates: int = 0  # (id, candidate_index) keys found more than once in the output
    missing: int = 0  # candidates of the input with no output row
    empty_group_rows: int = 0  # output rows of groups without candidates, all attempts

    def problems(self) -> list[str]:
        """Why the output cannot be trusted; empty when it can."""
        out = []
        if self.candidates_in != self.scored + self.errored + self.skipped:
            out.append(
                f"candidates in ({self.candidates_in}) != scored ({self.scored}) + errored "
                f"({self.errored}) + skipped ({self.skipped})"
            )
        if self.duplicates:
            out.append(f"{self.duplicates} candidate row(s) written more than once")
        if self.missing:
            out.append(f"{self.missing} candidate(s) of the input have no output row")
        if self.empty_group_rows != self.empty_groups:
            out.append(
                f"{self.empty_groups} group(s) without candidates in the input, "
                f"{self.empty_group_rows} such row(s) in the output"
            )
        return out


class JobCheckError(RuntimeError):
    """The output failed the count check: rows lost or doubled. Never silently accepted."""


class RunVerdictError(RuntimeError):
    """Nearly every candidate of the run ended with an error: complete, consistent, and useless."""


# The setting (or the data) that usually causes each error kind when it is the run's most common.
ERROR_HINTS: dict[str, str] = {
    "image_missing": "set images.root to the directory or prefix the image paths are relative to, or fix the paths",
    "image_empty": "the image files are empty (zero bytes): check how they were written",
    "image_undecodable": "check input.image_column: it must hold encoded images, {bytes, path} structs or paths",
    "image_unsupported": "check input.image_column: it must hold encoded images, {bytes, path} structs or paths",
    "image_too_large": "raise images.max_pixels or images.max_bytes",
    "image_placeholder_mismatch": "the questions' <image> placeholders must match the number of images per row",
    "image_tokens_in_text": "the text holds <IMG_CONTEXT> tokens: pass the question without the model's image tokens",
    "context_length": "set scoring.context_policy=truncate, or lower images.max_tiles",
    "invalid_question": "check input.question_column: the questions are null, empty or not strings",
    "no_candidates": "check input.responses_column: the response lists are null or empty",
    "invalid_response": "check input.responses_column (grouped) or input.response_column (flat)",
    "steps_unplaceable": "the responses contain the scoring marker text",
    "invalid_candidate_index": "check input.candidate_index_column: it is null or repeats within a group",
    "out_of_memory": "lower scoring.token_budget",
    "scorer_crash": "the scoring actors died on these rows: see their logs",
    "preparer_crash": "the preparation actors died on these rows: see their logs",
}


def run_verdict(counts: Counts, max_errored_fraction: float) -> dict | None:
    """Why a run whose rows nearly all errored failed, or None when it did not.

    Judged on the candidates this attempt handled (a resume judges what it scored, not what an
    earlier attempt committed).
    """
    handled = counts.scored + counts.errored
    if not handled or max_errored_fraction >= 1 or counts.errored <= max_errored_fraction * handled:
        return None
    kind, n = max(counts.errors_by_kind.items(), key=lambda kv: kv[1], default=("unknown", 0))
    stage = max(counts.errors_by_stage.items(), key=lambda kv: kv[1], default=("unknown", 0))[0]
    fraction = counts.errored / handled
    message = (
        f"{counts.errored} of {handled} candidates ({fraction:.0%}) ended with an error, over "
        f"runtime.max_errored_fraction={max_errored_fraction:g}; most are {kind} ({n}, stage {stage}): "
        f"{ERROR_HINTS.get(kind, 'see the error column')}"
    )
    return {"errored_fraction": fraction, "dominant_kind": kind, "count": n, "message": message}


def count_input(config: JobConfig, plan: ReadPlan) -> tuple[Counts, list[pa.Array] | None]:
    """Candidates in, from the input files alone (independent of what the pipeline did).

    Flat rows are candidates: the footers' row counts say how many. Grouped rows hold lists: where
    a row group's footer shows its responses column without a null or an empty list, its leaf
    value count is the number of candidates (:func:`~visualprm_ray.job.inputs.list_lengths_from_footer`);
    only the other row groups' responses are read, their chunks alone. An id column is read (its
    chunks alone, many files at once) to refuse ids that repeat or are null: resume and the
    exactly-once check key on the id, so two groups with one id could not be told apart. Ids
    derived for inputs without an id column (file path and row position) cannot repeat.

    Returns the counts and, for an input with an id column, each file's ids (Arrow arrays, in file
    order): what :func:`visualprm_ray.job.resume.plan_skips` needs to skip committed groups.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from visualprm_ray.job.outputs import DATA_THREADS
    from visualprm_ray.storage import parallel_map, read_parquet

    counts = Counts()
    if plan.layout == "flat":
        counts.candidates_in = plan.num_rows
        return counts, None
    inp = config.input

    def scan(i: int) -> tuple[int, int, pa.Array | None]:
        # Reduced in the reading thread: only the small results stay, never the text.
        f = plan.files[i]
        unknown = [g for g, n in enumerate(f.candidates or [None] * len(f.row_group_rows)) if n is None]
        candidates = sum(n for n in f.candidates if n is not None) if f.candidates else 0
        empty = 0
        metadata = None
        if f.footer is not None and (unknown or plan.has_id):
            import ray

            metadata = ray.get(f.footer)
        if unknown:
            table = read_parquet(
                f.uri,
                [inp.responses_column],
                config.storage,
                size=f.size,
                metadata=metadata,
                row_groups=unknown,
            )
            lengths = pc.fill_null(pc.list_value_length(table[inp.responses_column]), 0)
            candidates += int(pc.sum(lengths).as_py() or 0)
            empty = int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        ids = None
        if plan.has_id:
            table = read_parquet(f.uri, [inp.id_column], config.storage, size=f.size, metadata=metadata)
            ids = table[inp.id_column].combine_chunks().cast(pa.string())
        return candidates, empty, ids

    results = parallel_map(scan, len(plan.files), threads=DATA_THREADS)
    counts.groups_in = plan.num_rows
    counts.candidates_in = sum(r[0] for r in results)
    counts.empty_groups = sum(r[1] for r in results)
    if not plan.has_id:
        return counts, None
    ids = [r[2] for r in results]
    owners = np.repeat(np.arange(len(ids), dtype=np.int32), [len(a) for a in ids])
    _check_unique_ids(config, plan, pa.concat_arrays(ids) if ids else pa.array([], pa.string()), owners)
    return counts, ids


def _check_unique_ids(config: JobConfig, plan: ReadPlan, ids, owners) -> None:
    """Refuse null or repeated ids: by 64-bit hash first (8 bytes per id, where a hash table of the
    strings cost ~130 bytes per id), then as strings among the few rows whose hash repeats."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from visualprm_ray.job.outputs import repeated_keys, string_hashes
    from visualprm_ray.storage import redact

    name = config.input.id_column
    if ids.null_count:
        first = int(pc.index(pc.is_null(ids), True).as_py())
        raise ValueError(
            f"{redact(plan.uris[owners[first]])}: a row has a null {name!r}; every group needs an id"
        )
    hashes = string_hashes(ids)
    suspects = repeated_keys(hashes.copy())
    if not len(suspects):
        return
    rows = np.flatnonzero(np.isin(hashes, suspects))
    table = pa.table({"id": ids.take(pa.array(rows)), "n": pa.array(owners[rows])})
    repeated = table.group_by("id").aggregate([("n", "count")]).filter(pc.greater(pc.field("n_count"), 1))
    if len(repeated):
        value = repeated["id"][0].as_py()
        where = sorted({int(owners[i]) for i in pc.indices_nonzero(pc.equal(ids, value)).to_pylist()})
        files = ", ".join(redact(plan.uris[w]) for w in where[:2])
        raise ValueError(
            f"group id {value!r} appears more than once ({files}); resume and the exactly-once check key "
            f"on {name!r}, so ids must be unique ({len(repeated)} id(s) repeat)"
        )


def count_output(config: JobConfig, counts: Counts, committed: Committed) -> Counts:
    """Fill in what came out, from the output files alone, and check it against what went in.

    Every output file is read (its key and error columns only), many at once, and reduced to
    counts and one 64-bit key per candidate row as it arrives
    (:func:`~visualprm_ray.job.outputs.summarize_outputs`); the files an earlier attempt committed were read by the resume scan already and are not read
    again. Keys that repeat are looked at again as ``(id, candidate_index)`` strings: the
    duplicates reported are exact.
    """
    import numpy as np

    from visualprm_ray.job.outputs import repeated_keys, summarize_outputs
    from visualprm_ray.storage import list_files

    listing = list_files(config.output.uri, config.storage, recursive=False, detail=True)
    new = [i for i, (uri, _, _) in enumerate(listing) if uri not in committed.summaries]
    scanned = summarize_outputs(config, [listing[i] for i in new], torn="raise")
    # The keys of every file go into one array as each file's summary arrives, and the summary
    # lets go of them: at 100M candidates the check holds 800 MB of keys once, never twice.
    keys = np.empty(counts.candidates_in + 1024, np.uint64)
    at = 0
    for uri, _, _ in listing:
        r = committed.summaries.get(uri) or next(scanned)
        counts.rows_total += r.rows
        counts.empty_group_rows += r.rows - r.candidates
        if uri in committed.summaries:
            counts.skipped += r.candidates
        else:
            counts.rows_out += r.rows
            counts.errored += r.errored
            counts.scored += r.candidates - r.errored
            for name, into in (("by_stage", counts.errors_by_stage), ("by_kind", counts.errors_by_kind)):
                for key, n in getattr(r, name).items():
                    into[key] = into.get(key, 0) + n
        if at + len(r.keys) > len(keys):  # more rows than candidates in: duplicates, or a changed input
            keys = np.resize(keys, max(at + len(r.keys), len(keys) * 3 // 2))
        keys[at : at + len(r.keys)] = r.keys
        at += len(r.keys)
        r.keys = r.ids = None
    keys = keys[:at]
    repeated = repeated_keys(keys)
    counts.duplicates = _exact_duplicates(config, listing, repeated) if len(repeated) else 0
    distinct = len(keys) - counts.duplicates
    counts.missing = max(0, counts.candidates_in - distinct)
    return counts


def _exact_duplicates(config: JobConfig, listing, repeated) -> int:
    """Rows beyond the first of each ``(id, candidate_index)`` among the rows whose key repeats."""
    import numpy as np
    import pyarrow.compute as pc

    from visualprm_ray.job.outputs import DATA_THREADS, key_hashes
    from visualprm_ray.storage import parallel_imap, read_parquet

    def read(i: int):
        uri, size, _ = listing[i]
        table = read_parquet(uri, ["id", "candidate_index"], config.storage, size=size)
        return table.filter(pc.is_valid(table["candidate_index"]))

    pairs = []
    for table in parallel_imap(read, len(listing), threads=DATA_THREADS):
        keys = key_hashes(table["id"].combine_chunks(), table["candidate_index"].combine_chunks())
        hit = np.isin(keys, repeated)
        if hit.any():
            rows = table.filter(hit)
            pairs += zip(rows["id"].to_pylist(), rows["candidate_index"].to_pylist(), strict=True)
    return len(pairs) - len(set(pairs))
