"""Resume: what an interrupted run already committed, so that a rerun does only the rest.

**The unit of commit is one output Parquet file.** Every file holds whole groups: the explode into
candidate rows runs inside the write task and Ray writes all of a task's blocks into one file (no
``max_rows_per_file``), so a group's rows are never split across files. A Parquet file is
readable only once its footer, written last, is complete: a readable file is a committed one, and
a torn file (the writer was killed) fails to open. So on resume:

1. torn files are deleted (their groups are scored again);
2. a file that repeats a group already found in an earlier file is deleted too: that can only be
   the work of a straggler from the killed run (Ray workers outlive a SIGKILLed driver for a few
   seconds) that committed after the rerun had started; its other groups are scored again;
3. the ids of the groups in the remaining files are skipped by the read stage.

This keys on the group ``id``: the input's id column, or for inputs without one an id derived from
the file path and the row's position (see ``stages.read``). If the input changes between runs,
groups with new ids are scored and groups already committed stay as they are; the final count
check then compares the output with the *current* input and fails the job if they disagree
(e.g. rows removed from the input). The model (by content) and the scoring settings may not
change: the first attempt records them in ``_job.json`` and a resume under different ones is
refused, naming each changed key (``output.mode: overwrite`` / ``--fresh`` starts over).

Ray Data's own ``CheckpointConfig`` (beta) gives the same guarantee when a group's rows stay in
one write task, but deletes its checkpoint on success (a rerun of a finished job then writes
everything twice) and its filter actor needs a CPU that a busy actor pool may never free
(SPEC §5); the output files are the checkpoint here, so neither can happen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.inputs import FileSkip, ReadPlan
    from visualprm_ray.job.outputs import OutputSummary
    from visualprm_ray.model.source import ModelIdentity

logger = logging.getLogger(__name__)

JOB_RECORD = "_job.json"


@dataclass
class Committed:
    """The groups earlier attempts committed to the output."""

    files: list[str] = field(default_factory=list)
    ids: pa.Array | None = None  # the committed groups' ids, each once (Arrow strings)
    candidates: int = 0  # candidate rows (non-null candidate_index)
    empty_groups: int = 0  # rows of groups that had no candidates
    removed: list[str] = field(default_factory=list)  # torn or duplicate files deleted
    # Each kept file reduced for the count check, which then does not read it again.
    summaries: dict[str, OutputSummary] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return 0 if self.ids is None else len(self.ids)


def output_files(config: JobConfig) -> list[str]:
    """The job's own data files: the Parquet files directly in the output directory.

    Nested files are never the job's (it writes none): they are neither counted nor touched.
    """
    from visualprm_ray.storage import list_files

    return list_files(config.output.uri, config.storage, recursive=False)


def scan_committed(config: JobConfig, *, delete: bool = True) -> Committed:
    """Find the committed groups in the output; delete torn and duplicate files when ``delete``.

    Every output file's key and error columns are read, many files at once
    (:func:`visualprm_ray.job.outputs.summarize_outputs`). A file that repeats a group found in an
    earlier one (by hash of its ids: a collision only ever deletes a good file, whose groups are
    then scored again, never loses one) is a straggler's.
    """
    import numpy as np
    import pyarrow as pa

    from visualprm_ray.job.outputs import key_hashes, summarize_outputs
    from visualprm_ray.storage import fsspec_filesystem, list_files, redact

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    if not fs.exists(path):
        return Committed()
    listing = list_files(config.output.uri, config.storage, recursive=False, detail=True)
    scanned = list(summarize_outputs(config, listing, torn="none"))
    readable = [i for i, r in enumerate(scanned) if r is not None]
    hashes = [key_hashes(scanned[i].ids) for i in readable]
    owner = np.repeat(np.asarray(readable, np.int64), [len(h) for h in hashes])
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.lexsort((owner, flat))  # by hash, then file: the first file of a hash keeps it
    later = np.zeros(len(flat), bool)
    later[1:] = flat[order][1:] == flat[order][:-1]
    repeats = set(owner[order][later].tolist())

    committed = Committed()
    kept_ids = []
    for i, ((uri, _, _), result) in enumerate(zip(listing, scanned, strict=True)):
        reason = "torn (not a complete Parquet file)" if result is None else None
        if reason is None and i in repeats:
            reason = "it repeats groups committed in another file"
        if reason is not None:
            committed.removed.append(uri)
            logger.warning("resume: removing %s: %s", redact(uri), reason)
            if delete:
                fs.rm(fsspec_filesystem(uri, config.storage)[1])
            continue
        committed.files.append(uri)
        committed.summaries[uri] = result
        kept_ids.append(result.ids)
        result.ids = None  # held once, in committed.ids
        committed.empty_groups += result.rows - result.candidates
        committed.candidates += result.candidates
    committed.ids = pa.concat_arrays(kept_ids) if kept_ids else pa.array([], pa.string())
    return committed


def plan_skips(plan: ReadPlan, ids: list[pa.Array], committed: Committed) -> dict[int, FileSkip]:
    """What the read must leave out: row groups committed whole, and rows of the others.

    ``ids`` are each input file's group ids in row order. The committed ids are looked up once,
    here (by 64-bit hash, then compared as strings: :func:`~visualprm_ray.job.outputs.exact_isin`);
    a read task gets bitmaps of the rows to drop, never the ids.
    """
    import numpy as np
    import pyarrow as pa

    from visualprm_ray.job.inputs import FileSkip
    from visualprm_ray.job.outputs import exact_isin

    if not committed.groups or not ids:
        return {}
    done = exact_isin(pa.concat_arrays([a.cast(pa.string()) for a in ids]), committed.ids)
    skips: dict[int, FileSkip] = {}
    start = 0
    for index, file in enumerate(plan.files):
        whole, rows = set(), {}
        for group, n in enumerate(file.row_group_rows):
            mask = done[start : start + n]
            start += n
            if n and mask.all():
                whole.add(group)
            elif mask.any():
                rows[group] = np.packbits(mask).tobytes()
        if whole or rows:
            skips[index] = FileSkip(frozenset(whole), rows)
    return skips


def input_ids(config: JobConfig, plan: ReadPlan, given: list[pa.Array] | None) -> list[pa.Array]:
    """Each input file's group ids in row order: the id column's (read while counting), the ids
    derived from path and row, or for a regrouped flat input its group rows' ids."""
    import numpy as np

    from visualprm_ray.job import stages as col
    from visualprm_ray.job.outputs import DATA_THREADS
    from visualprm_ray.job.stages.read import derived_ids
    from visualprm_ray.storage import parallel_map, read_parquet

    if plan.internal:

        def read(i: int):
            f = plan.files[i]
            return read_parquet(f.uri, [col.ID], config.storage, size=f.size)[col.ID].combine_chunks()

        return parallel_map(read, len(plan.files), threads=DATA_THREADS)
    if given is not None:
        return given
    return [derived_ids(f.relpath, np.arange(f.num_rows, dtype=np.int64)) for f in plan.files]


# What the scores depend on besides the model: a resume under any other value is refused. Throughput
# knobs (budget, batch sizes, attention layout and kernel) leave the scores as they are and may be
# retuned between attempts, e.g. a smaller token budget after running out of memory.
_RECORDED = {
    "input": (
        "layout",
        "id_column",
        "question_column",
        "image_column",
        "responses_column",
        "response_column",
        "steps_column",
        "candidate_index_column",
    ),
    "images": ("root", "max_tiles", "max_pixels", "max_bytes"),
    "model": ("dtype", "system_message", "tokenizer"),
    "scoring": ("max_steps", "context_policy", "max_context", "threshold"),
}


def job_record(config: JobConfig, model: ModelIdentity) -> dict[str, Any]:
    """What must not change between the attempts of one output: the model's content and how it
    scores, as ``{"section.key": value}`` so that a refusal can name what changed."""
    record: dict[str, Any] = {"model.identity": model.digest}
    for section, keys in _RECORDED.items():
        values = getattr(config, section).model_dump(mode="json")
        record.update({f"{section}.{key}": values[key] for key in keys})
    return record


def record_changes(earlier: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every recorded key whose value differs (missing keys included)."""
    keys = sorted(set(earlier) | set(record))
    missing = object()
    out = []
    for key in keys:
        old, new = earlier.get(key, missing), record.get(key, missing)
        if old != new:
            show = ["(not recorded)" if v is missing else json.dumps(v) for v in (old, new)]
            out.append(f"{key}: {_clip(show[0])} -> {_clip(show[1])}")
    return out


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResumeConflict(RuntimeError):
    """The output holds part of a run made with another model or other scoring settings."""


def changes_since_recorded(config: JobConfig, record: dict[str, Any]) -> list[str] | None:
    """``key: old -> new`` for what differs from the output's job record; None when it has none."""
    from visualprm_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    target = f"{path.rstrip('/')}/{JOB_RECORD}"
    if not fs.exists(target):
        return None
    earlier = json.loads(fs.cat_file(target))
    return record_changes(earlier.get("record", earlier), record)


def check_job_record(config: JobConfig, record: dict[str, Any], *, write: bool = True) -> None:
    """On a resume, refuse a different job; on a first attempt, write the job record (``write``)."""
    from visualprm_ray.storage import fsspec_filesystem, redact

    fs, path = fsspec_filesystem(config.output.uri, config.storage)
    target = f"{path.rstrip('/')}/{JOB_RECORD}"
    changed = changes_since_recorded(config, record)
    if changed is not None:
        if changed:
            raise ResumeConflict(
                f"{redact(config.output.uri)} holds a run with other settings ({'; '.join(changed)}); "
                "resuming would mix two jobs in one table. Use --fresh (output.mode: overwrite) to "
                "start over, or write to another output."
            )
        return
    if not write:
        return
    fs.makedirs(path, exist_ok=True)
    with fs.open(target, "w") as f:
        # The source is kept for people reading the record; only the identity is compared.
        json.dump({"record": record, "model_source": redact(config.model.source)}, f, indent=2)
