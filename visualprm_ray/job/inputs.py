"""The input as the driver sees it: the files, their schema and row groups, the layout.

The driver plans the read before any Ray work starts (:func:`plan_read`); the read stage
(:mod:`visualprm_ray.job.stages.read`) then cuts its tasks from the row groups of
:class:`InputFile` and reads the columns the plan names. Nothing here needs Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pyarrow as pa

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from visualprm_ray.job.config import JobConfig


@dataclass(frozen=True)
class ReadPlan:
    """What the read stage decided from the input's schema; later stages need it to shape the output."""

    files: list[str]
    layout: Literal["grouped", "flat"]
    passthrough: list[pa.Field]  # output types of the passthrough columns
    has_id: bool
    has_steps: bool
    has_candidate_index: bool  # flat layout: an input column that orders the candidates
    schema: pa.Schema  # of the first file; the others are expected to match


@dataclass(frozen=True)
class InputFile:
    """One input file's row groups, from its footer: the units read tasks are cut from."""

    path: str  # on the input's pyarrow filesystem
    row_group_rows: tuple[int, ...]
    row_group_bytes: tuple[int, ...]  # uncompressed, all columns (an upper bound for a projection)

    @classmethod
    def from_metadata(cls, path: str, metadata: pq.FileMetaData) -> InputFile:
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        return cls(path, tuple(g.num_rows for g in groups), tuple(g.total_byte_size for g in groups))


def plan_read(config: JobConfig) -> ReadPlan:
    import pyarrow.parquet as pq

    from visualprm_ray.storage import list_files, pyarrow_filesystem

    files = list_files(config.input.uri, config.storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {config.input.uri}")
    fs, path = pyarrow_filesystem(files[0], config.storage)
    schema = pq.read_schema(path, filesystem=fs)
    inp = config.input
    names = set(schema.names)
    layout = inp.layout
    if layout == "auto":
        layout = "grouped" if inp.responses_column in names else "flat"
    required = [inp.question_column, inp.responses_column if layout == "grouped" else inp.response_column]
    if layout == "flat":
        required.append(inp.id_column)  # the group key cannot be derived for flat rows
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(
            f"input lacks column(s) {missing} needed by the {layout} layout; columns: {schema.names}"
        )
    known = {
        inp.id_column,
        inp.question_column,
        inp.image_column,
        inp.responses_column,
        inp.response_column,
        inp.steps_column,
    }
    has_candidate_index = layout == "flat" and "candidate_index" in names
    if has_candidate_index:
        known.add("candidate_index")
    if inp.passthrough == "all":
        chosen = [n for n in schema.names if n not in known]
    elif inp.passthrough == "none":
        chosen = []
    else:
        absent = [n for n in inp.passthrough if n not in names]
        if absent:
            raise ValueError(f"passthrough column(s) {absent} are not in the input")
        chosen = [n for n in inp.passthrough if n not in known]
    if inp.keep_image_bytes and inp.image_column in names:
        chosen.append(inp.image_column)
    # Binary columns are image payloads in practice: dropped unless asked for.
    passthrough = [
        schema.field(n)
        for n in chosen
        if inp.keep_image_bytes
        or (
            not pa.types.is_binary(schema.field(n).type)
            and not pa.types.is_large_binary(schema.field(n).type)
        )
    ]
    return ReadPlan(
        files=files,
        layout=layout,
        passthrough=passthrough,
        has_id=inp.id_column in names,
        has_steps=inp.steps_column in names,
        has_candidate_index=has_candidate_index,
        schema=schema,
    )
