"""The input as the driver sees it: the files, their schemas and row groups, the layout.

The driver plans the read before any Ray work starts (:func:`plan_read`): it lists the input,
reads **every** file's footer (many at once, one request each), and refuses a job whose files disagree on the columns
it reads (:class:`InputSchemaError`, naming the file and the difference). pyarrow would otherwise
skip a column a file lacks without a word, and a later file with its image column renamed would be
scored as text-only. The read stage (:mod:`visualprm_ray.job.stages.read`) then cuts its tasks from
the row groups of :class:`InputFile` and casts every block to :attr:`ReadPlan.schema`. Nothing here
needs Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

if TYPE_CHECKING:
    import pyarrow.fs
    import pyarrow.parquet as pq

    from visualprm_ray.job.config import JobConfig


class InputSchemaError(ValueError):
    """Input files that disagree on the columns the job reads; the message names the file."""


@dataclass(frozen=True)
class InputFile:
    """One input file's row groups, from its footer: the units read tasks are cut from."""

    uri: str  # the file's full URI (a local path, s3://...)
    row_group_rows: tuple[int, ...]
    row_group_bytes: tuple[int, ...]  # uncompressed, all columns (an upper bound for a projection)
    relpath: str = ""  # relative to the input root: the prefix of the ids derived for its rows
    # Uncompressed bytes of each top-level column, summed over the row groups.
    column_bytes: tuple[tuple[str, int], ...] = ()
    size: int | None = None  # bytes, from the listing: opening the file needs no HEAD request
    # The footer in Ray's object store (when Ray runs): read tasks reuse it instead of reading it
    # again, once per task, which cost time quadratic in a file's row groups.
    footer: Any = field(default=None, compare=False, repr=False)
    # Grouped layout: each row group's candidates as its footer tells them (the responses column's
    # leaf values, when its statistics show no null and no empty list), else None: read to count.
    candidates: tuple[int | None, ...] = ()

    @classmethod
    def from_metadata(
        cls,
        uri: str,
        metadata: pq.FileMetaData,
        relpath: str = "",
        *,
        size: int | None = None,
        footer: Any = None,
    ) -> InputFile:
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        sizes: dict[str, int] = {}
        for g in groups:
            for c in range(g.num_columns):
                chunk = g.column(c)
                name = chunk.path_in_schema.split(".", 1)[0]
                sizes[name] = sizes.get(name, 0) + chunk.total_uncompressed_size
        return cls(
            uri,
            tuple(g.num_rows for g in groups),
            tuple(g.total_byte_size for g in groups),
            relpath or uri.rsplit("/", 1)[-1],
            tuple(sorted(sizes.items())),
            size,
            footer,
        )

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class FileSkip:
    """What an earlier attempt committed of one input file, as the read must skip it.

    ``row_groups``: committed whole, never read; ``rows``: for a partly committed row group, a
    bitmap (``np.packbits``) of its rows to drop. Decided once on the driver, so a read task
    never looks ids up in the set of committed ids.
    """

    row_groups: frozenset[int] = frozenset()
    rows: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadPlan:
    """What the driver decided from the input's schemas; the read stage and the writer follow it."""

    uris: list[str]  # the input files, in order (full URIs)
    files: list[InputFile]  # the same files' footers, in the same order
    layout: Literal["grouped", "flat"]
    passthrough: list[pa.Field]  # output types of the passthrough columns
    has_id: bool
    has_steps: bool
    candidate_index_column: str | None  # flat layout: the input column that orders the candidates
    schema: pa.Schema  # every column the read stage reads, in the types every block is cast to
    # The files hold group rows under the job's internal column names (a regrouped flat input).
    internal: bool = False

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def column_sizes(self) -> dict[str, int]:
        """Uncompressed bytes of each column over every file, from the footers: what output
        files are sized from (the job's score files, the export's dataset files)."""
        sizes: dict[str, int] = {}
        for f in self.files:
            for name, size in f.column_bytes:
                sizes[name] = sizes.get(name, 0) + size
        return sizes


def _normal(t: pa.DataType) -> pa.DataType:
    """One type per family: large and view variants are the same data to the job."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(_normal(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_normal(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _normal(f.type)) for f in t])
    return t


def _compatible(a: pa.DataType, b: pa.DataType) -> bool:
    # An all-null column written by a tool that could not infer its type is every type.
    return pa.types.is_null(a) or pa.types.is_null(b) or _normal(a) == _normal(b)


def read_footers(
    listing: list[tuple[str, int, str]], config: JobConfig
) -> list[tuple[pq.FileMetaData, pa.Schema]]:
    """Every listed file's footer (``(uri, size, version)`` entries), many at once, in order.

    One request per file (its last 64 KiB; two when the footer is bigger), no HEAD: the listing
    gave the size.
    """
    import pyarrow.parquet as pq

    from visualprm_ray.storage import TornFile, open_for_read, parallel_map, redact, with_retries

    def read(i: int) -> tuple[pq.FileMetaData, pa.Schema]:
        uri, size, _ = listing[i]

        def once() -> tuple[pq.FileMetaData, pa.Schema]:
            with open_for_read(uri, config.storage, size=size) as f:
                try:
                    parquet = pq.ParquetFile(f)
                except pa.ArrowInvalid as exc:
                    raise TornFile(f"{redact(uri)} is not a valid Parquet file: {exc}") from None
                return parquet.metadata, parquet.schema_arrow

        return with_retries(once, what=f"reading the footer of {redact(uri)}", retries=config.storage.retries)

    return parallel_map(read, len(listing))


def relative_names(input_uri: str, uris: list[str]) -> list[str]:
    """Each file's path relative to the input root (a directory, a glob's fixed part, or a file's folder)."""
    from visualprm_ray.storage import split_uri

    protocol, root = split_uri(input_uri)
    if protocol == "file":
        import os

        root = os.path.abspath(os.path.expanduser(root))
    for ch in ("*", "?", "["):
        if ch in root:
            root = root[: root.rfind("/", 0, root.index(ch))]
    root = root.rstrip("/")
    out = []
    for uri in uris:
        path = split_uri(uri)[1]
        out.append(path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1])
    return out


def plan_read(config: JobConfig, listing: list[tuple[str, int, str]] | None = None) -> ReadPlan:
    """List the input (unless the driver did: ``listing``, ``(uri, size, version)`` entries), read
    every footer, decide the layout and the columns, check every file."""
    from visualprm_ray.storage import list_files

    if listing is None:
        listing = list_files(config.input.uri, config.storage, detail=True)
    uris = [uri for uri, _, _ in listing]
    if not uris:
        raise FileNotFoundError(f"no Parquet files under {config.input.uri}")
    footers = read_footers(listing, config)
    first = footers[0][1]
    inp = config.input
    names = set(first.names)
    layout, required = choose_layout(config, first)
    index_column = inp.candidate_index_column if layout == "flat" else None
    if index_column is not None and index_column not in names:
        index_column = None
    optional = [inp.id_column, inp.image_column, inp.steps_column, *([index_column] if index_column else [])]
    known = {
        inp.id_column,
        inp.question_column,
        inp.image_column,
        inp.responses_column,
        inp.response_column,
        inp.steps_column,
    }
    if layout == "flat" and inp.candidate_index_column:
        known.add(inp.candidate_index_column)  # never passed through: it is the output's own column
    if inp.passthrough == "all":
        chosen = [n for n in first.names if n not in known]
    elif inp.passthrough == "none":
        chosen = []
    else:
        absent = [n for n in inp.passthrough if n not in names]
        if absent:
            raise InputSchemaError(f"passthrough column(s) {absent} are not in the input")
        chosen = [n for n in inp.passthrough if n not in known]
    from visualprm_ray.schema import RESERVED

    # The user's own names come out too: their id column beside the output's ``id`` (a query on
    # ``prompt_id`` keeps working; ``id`` is what resume, reports and evaluations key on) and the
    # question, unless output.include_question is off.
    own = [inp.id_column] if inp.id_column in names and inp.id_column not in RESERVED else []
    if config.output.include_question and inp.question_column not in RESERVED:
        own.append(inp.question_column)
    chosen = [*own, *(n for n in chosen if n not in own)]
    clash = [n for n in chosen if n in RESERVED]
    if clash:
        raise InputSchemaError(
            f"input column(s) {clash} would be passed through under the name of an output column; "
            "list the columns to pass through (input.passthrough) or rename them in the input"
        )
    if inp.keep_image_bytes and inp.image_column in names:
        chosen.append(inp.image_column)
    # Binary columns are image payloads in practice: dropped unless asked for.
    passthrough = [
        first.field(n)
        for n in chosen
        if inp.keep_image_bytes
        or (not pa.types.is_binary(first.field(n).type) and not pa.types.is_large_binary(first.field(n).type))
    ]
    read = list(
        dict.fromkeys([*required, *(c for c in optional if c in names), *(f.name for f in passthrough)])
    )
    schema = pa.schema([pa.field(c, _normal(first.field(c).type)) for c in read])
    relpaths = relative_names(inp.uri, uris)
    files = []
    for (uri, size, _), relpath, (metadata, file_schema) in zip(listing, relpaths, footers, strict=True):
        _check_file(
            uri, file_schema, first, schema, optional, chosen_all=inp.passthrough == "all", known=known
        )
        file = InputFile.from_metadata(uri, metadata, relpath, size=size, footer=keep_footer(metadata))
        if layout == "grouped":
            file = replace(file, candidates=list_lengths_from_footer(metadata, inp.responses_column))
        files.append(file)
    return ReadPlan(
        uris=uris,
        files=files,
        layout=layout,
        passthrough=[pa.field(f.name, _normal(f.type)) for f in passthrough],
        has_id=inp.id_column in names,
        has_steps=inp.steps_column in names,
        candidate_index_column=index_column,
        schema=schema,
    )


def choose_layout(config: JobConfig, schema: pa.Schema) -> tuple[Literal["grouped", "flat"], list[str]]:
    """The layout (``input.layout``, or for ``auto`` grouped when the responses list column is
    there) and the columns it needs; :class:`InputSchemaError` saying which are missing and why."""
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
        raise InputSchemaError(_missing_columns(config, schema, layout, missing))
    return layout, required


def _missing_columns(config: JobConfig, schema: pa.Schema, layout: str, missing: list[str]) -> str:
    """What is missing, why the layout is what it is, and which setting names the user's column."""
    inp = config.input
    setting = {
        inp.question_column: "input.question_column",
        inp.responses_column: "input.responses_column",
        inp.response_column: "input.response_column",
        inp.id_column: "input.id_column",
    }
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    texts = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    named = ", ".join(f"{c!r} ({setting[c]})" for c in missing)
    why = ""
    if inp.layout == "auto":
        why = (
            f" layout auto chose {layout} because the input has "
            + (
                f"a {inp.responses_column!r} column"
                if layout == "grouped"
                else f"no {inp.responses_column!r} column"
            )
            + " (grouped: one row per question with a list of responses; flat: one row per candidate)."
        )
    hint = ""
    if layout == "flat" and inp.layout == "auto" and lists:
        hint = f" If {lists[0]!r} holds each question's responses, set input.responses_column={lists[0]}."
    elif texts:
        hint = f" Its text columns: {texts}; set the setting above to the one that holds it."
    return f"input lacks {named}, needed by the {layout} layout;{why}{hint} Columns: {schema.names}"


def list_lengths_from_footer(metadata: pq.FileMetaData, column: str) -> tuple[int | None, ...]:
    """Per row group, the total length of the lists in ``column``, when the footer alone says it.

    A list column's leaf holds one value per element, plus one per null or empty list. With no
    nulls at all in the leaf's statistics there is neither, and the leaf's value count is the
    number of elements: the candidates are counted without reading a byte of their text.
    """
    out: list[int | None] = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        leaves = [group.column(c) for c in range(group.num_columns)]
        leaves = [c for c in leaves if c.path_in_schema.split(".", 1)[0] == column]
        count = None
        if len(leaves) == 1 and leaves[0].path_in_schema != column:
            stats = leaves[0].statistics
            if stats is not None and stats.has_null_count and stats.null_count == 0:
                count = leaves[0].num_values
        if group.num_rows == 0:
            count = 0
        out.append(count)
    return tuple(out)


def keep_footer(metadata: pq.FileMetaData) -> Any:
    """The footer in Ray's object store when Ray runs (the read tasks take it from there), else None.

    Not kept in the driver's memory: 100,000 files' footers would take gigabytes there.
    """
    import ray

    return ray.put(metadata) if ray.is_initialized() else None


def fs_path(uri: str) -> str:
    """The path of a listed file on the input's pyarrow filesystem (as ``pyarrow_filesystem`` gives it)."""
    import os

    from visualprm_ray.storage import split_uri

    protocol, path = split_uri(uri)
    return os.path.abspath(path) if protocol == "file" else path.rstrip("/")


def _check_file(
    uri: str,
    schema: pa.Schema,
    first: pa.Schema,
    read: pa.Schema,
    optional: list[str],
    *,
    chosen_all: bool,
    known: set[str],
) -> None:
    """Refuse a file whose columns differ from the first file's in a way the job would act on."""
    from visualprm_ray.storage import redact

    names = set(schema.names)
    problems = []
    absent = [f.name for f in read if f.name not in names]
    if absent:
        problems.append(f"lacks column(s) {absent}")
    extra = [c for c in optional if c in names and c not in first.names]
    if extra:
        problems.append(f"has column(s) {extra} that the first file lacks")
    if chosen_all:
        new = [n for n in schema.names if n not in first.names and n not in known]
        if new:
            problems.append(
                f"has column(s) {new} that the first file lacks (passthrough 'all' follows the first file)"
            )
    for column in read:
        if column.name in names and not _compatible(schema.field(column.name).type, column.type):
            problems.append(
                f"column {column.name!r} is {schema.field(column.name).type}, the first file's is {column.type}"
            )
    if problems:
        raise InputSchemaError(
            f"input file {redact(uri)} does not match the first file ({'; '.join(problems)}); every file "
            "of one job must hold the same columns in the same types"
        )
