"""Read: Parquet shards -> one row per group, with the job's internal column names.

The driver has already opened every input file once (to count candidates and check ids), so it
knows each file's row groups; :class:`~visualprm_ray.stages.read_source.InputGroups` cuts read
tasks from those row groups and each task yields blocks of a fixed number of rows. That gives
blocks small enough for every preparer to get work even on a tiny input, and never larger than a
few batches on a huge one, without Ray Data's footer-reading actors or a repartition step (on a
small machine those cost more start-up than the read itself). Only the columns the job needs are
read (the configured ones plus passthrough), over a pyarrow filesystem for any protocol. The flat
layout (one row per candidate) is grouped by id with a shuffle so that ranks always see the
whole group.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pyarrow as pa

from visualprm_ray import stages as col

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    import ray.data

    from visualprm_ray.config import JobConfig


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


def read_groups(
    config: JobConfig,
    plan: ReadPlan,
    files: Sequence[InputFile],
    *,
    rows_per_block: int,
    skip_ids: ray.ObjectRef | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of group rows: internal columns plus passthrough columns.

    ``files`` are the input files with their row groups (:func:`visualprm_ray.pipeline.count_input`
    reads them); ``skip_ids`` (a string array in the object store) holds the ids of groups an
    earlier attempt already committed (:mod:`visualprm_ray.resume`); their rows are dropped right
    after the ids are known, before any work is spent on them.
    """
    import ray.data

    from visualprm_ray.stages.read_source import InputGroups
    from visualprm_ray.storage import pyarrow_filesystem

    inp = config.input
    fs, _ = pyarrow_filesystem(plan.files[0], config.storage)
    wanted = [inp.question_column, inp.image_column]
    wanted += [inp.responses_column] if plan.layout == "grouped" else [inp.response_column]
    wanted += [inp.id_column] if plan.has_id else []
    wanted += [inp.steps_column] if plan.has_steps else []
    wanted += ["candidate_index"] if plan.has_candidate_index else []
    wanted += [f.name for f in plan.passthrough]
    columns = [c for c in dict.fromkeys(wanted) if c in plan.schema.names]  # the image is optional
    source = InputGroups(
        files,
        fs,
        columns=columns,
        schema=pa.schema([plan.schema.field(c) for c in columns]),
        rows_per_block=rows_per_block,
        include_paths=not plan.has_id,
        retries=config.storage.retries,
    )
    ds = ray.data.read_datasource(source)
    rename = _Rename(config, plan, skip_ids)
    ds = ds.map_batches(rename, batch_format="pyarrow", zero_copy_batch=True)
    if plan.layout == "flat":
        ds = ds.groupby(col.ID).map_groups(
            flat_to_group,
            batch_format="pyarrow",
            fn_kwargs={"passthrough": [f.name for f in plan.passthrough]},
        )
    return ds


class _Rename:
    """Configured column names -> internal names; derives ids where the input has none."""

    def __init__(self, config: JobConfig, plan: ReadPlan, skip_ids: ray.ObjectRef | None = None) -> None:
        inp = config.input
        self.skip_ids = skip_ids
        self.mapping = {inp.question_column: col.QUESTION, inp.image_column: col.IMAGE}
        if plan.layout == "grouped":
            self.mapping[inp.responses_column] = col.RESPONSES
        else:
            self.mapping[inp.response_column] = col.RESPONSES
        if plan.has_id:
            self.mapping[inp.id_column] = col.ID
        if plan.has_steps:
            self.mapping[inp.steps_column] = col.STEPS
        if plan.has_candidate_index:
            self.mapping["candidate_index"] = col.CANDIDATE_INDEX
        self.keep_image = inp.keep_image_bytes
        self.image_column = inp.image_column
        self.has_id = plan.has_id

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.keep_image and self.image_column in table.column_names:
            # The image is both an input (under the internal name) and a passthrough column.
            table = table.append_column(col.IMAGE, table[self.image_column])
            mapping = {k: v for k, v in self.mapping.items() if k != self.image_column}
        else:
            mapping = self.mapping
        table = table.rename_columns([mapping.get(n, n) for n in table.column_names])
        if col.IMAGE not in table.column_names:
            table = table.append_column(col.IMAGE, pa.nulls(len(table), pa.binary()))
        if not self.has_id:
            table = table.append_column(col.ID, pa.array(_derived_ids(table), pa.string()))
            table = table.drop_columns(["path"])
        else:
            table = table.set_column(
                table.column_names.index(col.ID), col.ID, table[col.ID].cast(pa.string())
            )
        if self.skip_ids is not None:
            import pyarrow.compute as pc

            done = pc.is_in(table[col.ID], value_set=_object(self.skip_ids))
            table = table.filter(pc.invert(pc.fill_null(done, False)))
        return table


_OBJECTS: dict[str, pa.Array] = {}


def _object(ref: ray.ObjectRef) -> pa.Array:
    """An object-store value, fetched once per worker process (the id set can be large)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        _OBJECTS.clear()  # one job's set at a time
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


def _derived_ids(table: pa.Table) -> list[str]:
    """``<file name>:<content hash>``: stable across re-sharding and reruns, unlike a row number."""
    seen: dict[str, int] = {}
    ids = []
    questions = table[col.QUESTION].to_pylist()
    responses = table[col.RESPONSES].to_pylist()
    for path, q, r in zip(table["path"].to_pylist(), questions, responses, strict=True):
        digest = hashlib.sha1(repr((q, r)).encode()).hexdigest()[:16]
        key = f"{posixpath.basename(path)}:{digest}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        # Identical rows of a file meeting in one batch still get distinct ids.
        ids.append(key if n == 0 else f"{key}-{n}")
    return ids


def flat_to_group(table: pa.Table, passthrough: list[str]) -> pa.Table:
    """One group row from the flat rows sharing an id.

    Candidates are ordered by an input ``candidate_index`` column when there is one, else by
    response text: the shuffle does not keep input order, and a deterministic order keeps
    ``candidate_index`` stable across reruns. Passthrough values stay per candidate (as lists).
    """
    rows = table.to_pylist()
    if col.CANDIDATE_INDEX in table.column_names:
        rows.sort(key=lambda r: (r[col.CANDIDATE_INDEX] is None, r[col.CANDIDATE_INDEX]))
        indices = [r[col.CANDIDATE_INDEX] for r in rows]
    else:
        rows.sort(key=lambda r: (r[col.RESPONSES] is None, r[col.RESPONSES] or ""))
        indices = list(range(len(rows)))
    first = rows[0]
    out = {
        col.ID: pa.array([first[col.ID]], pa.string()),
        col.QUESTION: pa.array([first[col.QUESTION]], table.schema.field(col.QUESTION).type),
        col.IMAGE: pa.array([first[col.IMAGE]], table.schema.field(col.IMAGE).type),
        col.RESPONSES: pa.array(
            [[r[col.RESPONSES] for r in rows]], pa.list_(table.schema.field(col.RESPONSES).type)
        ),
        col.CANDIDATE_INDEX: pa.array([indices], pa.list_(pa.int32())),
    }
    if col.STEPS in table.column_names:
        out[col.STEPS] = pa.array(
            [[r[col.STEPS] for r in rows]], pa.list_(table.schema.field(col.STEPS).type)
        )
    for name in passthrough:
        out[name] = pa.array([[r[name] for r in rows]], pa.list_(table.schema.field(name).type))
    return pa.table(out)
