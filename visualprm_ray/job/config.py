"""The job configuration: one YAML file, overridable from the command line.

A job is described by a :class:`JobConfig` with these sections:

``input``
    Where the rollouts are (Parquet file, directory/prefix or glob; local, ``s3://`` or ``gs://``), how
    they are laid out (``grouped``: one row per question with a list of responses; ``flat``: one row per
    candidate response) and which columns hold what.
``images``
    How images are found and the limits that guard the decoders (pixel count, encoded size).
``model``
    The VisualPRM checkpoint to load, its dtype, attention kernel and tokenizer backend.
``scoring``
    How conversations are built and batched: step merging, tokens per forward pass, context policy.
``output``
    Where the scores go, and what happens when that place already holds results (resume by default).
``runtime``
    Ray: cluster address, device, how many scoring and preparation actors and their resources, error policy.
``storage``
    Object-store options (endpoint, anonymous access, region, retries), shared by input, model and output.

Every model forbids unknown keys, so a typo is an error that names the key rather than a silently ignored
setting. Every field carries a description; :func:`describe_fields` turns them into documentation rows.

:meth:`JobConfig.from_sources` builds a configuration the way the CLI does. Precedence, lowest first:

1. the YAML file (if any),
2. the CLI's shortcut flags (``--input``, ``--output``, ``--model`` → ``input_uri=...`` etc.),
3. ``--set a.b=c`` overrides, in order (a later ``--set`` of the same key wins).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visualprm_ray.storage import StorageOptions

if TYPE_CHECKING:
    from typing_extensions import Self

    from visualprm_ray.model.scoring.options import KernelOptions

__all__ = [
    "ConfigError",
    "ImagesConfig",
    "InputConfig",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "RuntimeConfig",
    "ScoringConfig",
    "SectionedConfig",
    "StorageOptions",
    "describe_fields",
]


class ConfigError(ValueError):
    """A configuration that cannot be loaded or does not validate; the message is meant for the user."""


# --------------------------------------------------------------------------------------------- sections


class InputConfig(BaseModel):
    """Where the rollouts are read from and how their columns are named."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        ...,
        description="Parquet file, directory/prefix or glob to read; a local path, s3:// or gs:// URI.",
    )
    layout: Literal["auto", "grouped", "flat"] = Field(
        "auto",
        description=(
            "Row layout: 'grouped' is one row per question with a list column of responses, 'flat' is one row "
            "per candidate where rows with the same id form a group, 'auto' picks 'grouped' if the responses "
            "column exists and 'flat' otherwise."
        ),
    )
    id_column: str = Field(
        "id", description="Column identifying a question (the group key in the flat layout)."
    )
    question_column: str = Field("question", description="Column holding the question text.")
    image_column: str = Field(
        "image",
        description="Column holding the image(s): a path/URI, encoded bytes, or a list of either.",
    )
    responses_column: str = Field(
        "responses", description="Grouped layout: column holding the list of candidate responses."
    )
    response_column: str = Field(
        "response", description="Flat layout: column holding the one candidate response of the row."
    )
    steps_column: str = Field(
        "steps",
        description="Optional column of pre-split steps (a list of strings per response); used when present.",
    )
    candidate_index_column: str | None = Field(
        "candidate_index",
        description=(
            "Flat layout: column giving each candidate's position in its group, used when the input has it "
            "(a null or repeated value makes the group an 'invalid_candidate_index' error); without it, or "
            "when null, candidates are numbered in input order (file, then row)."
        ),
    )
    passthrough: Literal["all", "none"] | list[str] = Field(
        "all",
        description="Other input columns copied to the output: 'all', 'none', or a list of column names.",
    )
    keep_image_bytes: bool = Field(
        False,
        description="Keep binary image columns in the output; they are dropped unless this is set.",
    )
    num_blocks: int | None = Field(
        None,
        ge=1,
        description=(
            "Spread the input over about this many blocks (each at most 4 batches); null: one "
            "batch of groups per block."
        ),
    )


class ImagesConfig(BaseModel):
    """How images are located and the limits that guard decoding."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None,
        description="Prefix (local directory or object-store URI) for relative image paths; null leaves them as is.",
    )
    max_tiles: int | None = Field(
        None,
        ge=1,
        description="Most 448x448 tiles per image (plus the thumbnail); null uses the checkpoint's max_dynamic_patch.",
    )
    max_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Largest width x height accepted, checked on the header before decoding (decompression-bomb guard).",
    )
    max_bytes: int = Field(
        50_000_000, ge=1, description="Largest encoded image size in bytes; bigger images are an error."
    )


class ModelConfig(BaseModel):
    """The VisualPRM checkpoint and how it is loaded."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        ...,
        description="The checkpoint: a local directory, an s3:// or gs:// prefix, or a Hugging Face hub id.",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weight and activation dtype (float32 is the usual choice on CPU)."
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field(
        "sdpa", description="Attention kernel of the language model."
    )
    cache_dir: str | None = Field(
        None,
        description="Local cache for checkpoints fetched from an object store; null means $VISUALPRM_CACHE or ~/.cache/visualprm-ray/models.",
    )
    system_message: str | None = Field(
        None,
        description="System message override; null uses the checkpoint's own, or InternVL's default if it has none.",
    )
    tokenizer: Literal["auto", "sentencepiece", "tokenizers"] = Field(
        "auto",
        description="Tokenizer backend: 'sentencepiece' (tokenizer.model), 'tokenizers' (tokenizer.json), or 'auto' to pick what the checkpoint has.",
    )


class KernelsConfig(BaseModel):
    """The scorer's optional fast paths (visualprm_ray.model.scoring.options): how the scores are
    computed, never which; each is tested against the naive forward, and each is off by default
    until a GPU run has measured it (docs/PERFORMANCE.md)."""

    model_config = ConfigDict(extra="forbid")

    attention: Literal["padded", "varlen"] = Field(
        "padded",
        description="prefix_mode shared_prefix only: 'varlen' runs both attention parts through variable-length flash attention on the packed row (no padded copies, grouped key/value heads not repeated); 'padded' builds a right-padded copy for the candidates' own attention.",
    )
    merge: Literal["eager", "compiled"] = Field(
        "eager",
        description="prefix_mode shared_prefix only: 'compiled' merges the two attention parts by their log-sum-exps in one compiled kernel (torch.compile; the first batch pays the compile); 'eager' uses plain torch ops.",
    )
    leaf_ops: Literal["eager", "compiled"] = Field(
        "eager",
        description="'compiled' runs the language model's RMSNorm, rotary rotation and SwiGLU product as compiled functions (torch.compile, dynamic shapes); 'eager' leaves the model's own.",
    )
    rotary: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="'static' skips transformers' dynamic rotary-scaling check (a device read-back per forward); refused when the context can reach the scaling threshold (32,768 positions for VisualPRM-8B).",
    )
    host_syncs: Literal["default", "avoid"] = Field(
        "default",
        description="'avoid' copies index tensors to the GPU from pinned memory without waiting, counts image tokens on the host and skips transformers' packed-sequence check; 'default' does neither.",
    )

    def options(self) -> KernelOptions:
        """The scorer's :class:`~visualprm_ray.model.scoring.options.KernelOptions` (same fields)."""
        from visualprm_ray.model.scoring.options import KernelOptions

        return KernelOptions(**self.model_dump())


class ScoringConfig(BaseModel):
    """How conversations are built and batched for the reward model."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(
        12,
        ge=1,
        description="Most steps per response: beyond it, consecutive pieces are merged in chunks of ceil(pieces / max_steps), as VisualPRM does; null disables merging.",
    )
    token_budget: int = Field(
        16384,
        ge=256,
        description="Tokens per forward pass of the language model, padding included (rows x longest row; prefix_mode shared_prefix packs candidates without padding, so there it counts real tokens); at least 256.",
    )
    vision_batch: int = Field(16, ge=1, description="Image tiles per forward pass of the vision encoder.")
    prefix_mode: Literal["auto", "packed", "prefix_cache", "shared_prefix"] = Field(
        "auto",
        description="How a group shares its prefix: 'prefix_cache' runs the prefix once and the candidates against its keys/values, 'shared_prefix' does the same with the candidates packed into one row without padding, all attending to a single copy of the prefix keys/values (attention in two parts merged exactly; not yet measured on a GPU), 'packed' puts all candidates in one row with a tree mask; 'auto' picks shared_prefix on CPU, prefix_cache on CUDA, packed with flex attention.",
    )
    context_policy: Literal["error", "truncate"] = Field(
        "error",
        description="A conversation longer than the model's context: 'error' records a context_length error for that candidate; 'truncate' scores the leading whole steps that fit and sets the row's `truncated` flag.",
    )
    max_context: int | None = Field(
        None,
        ge=1,
        description="Override of the model's context length in tokens; null uses the checkpoint's.",
    )
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Probability above which a step counts as correct; recorded in the output for downstream use.",
    )
    kernels: KernelsConfig = Field(
        default_factory=KernelsConfig,
        description="Optional fast paths of the scorer (same scores, other kernels); all off by default.",
    )


class OutputConfig(BaseModel):
    """Where the scores are written and how an existing output is treated."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="Output directory/prefix; a local path, s3:// or gs:// URI.")
    mode: Literal["resume", "overwrite", "error"] = Field(
        "resume",
        description="If the output exists: 'resume' keeps the groups already committed (readable output files) and scores the rest; a finished run (_SUCCESS) is a no-op unless the input changed (then its new ids are scored), and a changed model or scoring setting is refused either way; 'overwrite' starts fresh (the CLI's --fresh); 'error' fails.",
    )
    include_response: bool = Field(True, description="Copy the response text into the output rows.")
    include_question: bool = Field(
        True,
        description=(
            "Copy the question (input.question_column) into the output rows under its input name, so the "
            "table reads without a join back to the input."
        ),
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        "zstd", description="Parquet compression codec of the output files."
    )
    target_file_bytes: int = Field(
        64 << 20,
        ge=1 << 10,
        description=(
            "About how many bytes (uncompressed) an output file holds: rows per file follow from the input's "
            "bytes per candidate, so 10M candidates make hundreds of files, not tens of thousands. A file "
            "always holds whole groups, and is the unit a kill can lose (see docs/OPERATIONS.md)."
        ),
    )
    min_rows_per_file: int | None = Field(
        None,
        ge=1,
        description=(
            "Rows per output file, overriding target_file_bytes (fewer for the last file); small jobs and "
            "tests set it low to get many small files."
        ),
    )


class RuntimeConfig(BaseModel):
    """Ray: where to run, how many actors of each kind, and what to do on errors."""

    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = Field(
        None, description="Ray cluster address; null uses $RAY_ADDRESS if set, else starts a local Ray."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Where the scoring actors run: 'auto' uses CUDA when the cluster has GPUs, else CPU.",
    )
    num_scorers: int | None = Field(
        None,
        ge=1,
        description="Number of scoring actors; null means one per GPU, or on CPU as many model replicas as the nodes' cores and memory allow (one when the checkpoint's size is unknown).",
    )
    max_scorers: int | None = Field(
        None,
        ge=1,
        description=(
            "Most scoring actors when the cluster grows (an autoscaling KubeRay cluster adds GPU nodes while "
            "the job runs): the pool starts with num_scorers (or what the cluster holds at start) and adds "
            "actors up to this as nodes join; null keeps the pool at its starting size."
        ),
    )
    gpus_per_scorer: float = Field(
        1.0, gt=0, description="GPUs reserved per scoring actor (fractions share a GPU); ignored on CPU."
    )
    cpus_per_scorer: float = Field(1.0, gt=0, description="CPUs reserved per scoring actor.")
    cpu_threads_per_scorer: int | None = Field(
        None,
        ge=1,
        description="Torch threads of a scoring actor on CPU; null gives each replica an equal share of its node's cores.",
    )
    num_preparers: int | None = Field(
        None,
        ge=1,
        description="Number of CPU actors decoding and tiling images and tokenizing; null chooses automatically.",
    )
    cpus_per_preparer: float = Field(1.0, gt=0, description="CPUs reserved per preparation actor.")
    groups_per_batch: int = Field(
        8, ge=1, description="Question groups per batch handed from the preparers to the scoring actors."
    )
    on_error: Literal["record", "raise"] = Field(
        "record",
        description="A group that fails: 'record' writes its error in the output and goes on, 'raise' fails the job.",
    )
    progress_interval_s: float = Field(30.0, gt=0, description="Seconds between progress lines.")
    max_actor_start_failures: int = Field(
        10,
        ge=0,
        description=(
            "Actors of one stage that may fail to start (model download, CUDA init) in a row before the job "
            "fails naming the cause; each failed actor is replaced, and any actor that starts resets the count."
        ),
    )
    max_crashes_per_group: int = Field(
        2,
        ge=1,
        description="A group held by a scoring or preparation actor that died this many times is recorded as a 'scorer_crash' or 'preparer_crash' error instead of being retried again (a poison row never loops).",
    )
    stall_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Fail the job with a clear message naming the stalled stages when none makes progress for this long (Ray Data's execution_no_progress_timeout_s): an actor pool that can never start, a hung read. Ray Data switches this guard off around a shuffle, so it does not apply to the flat layout's regroup pass (it does to its scoring pass).",
    )
    max_errored_fraction: float = Field(
        0.9,
        ge=0,
        le=1,
        description=(
            "A run in which more than this fraction of the candidates it handled ended with an error fails "
            "(exit status 4, no _SUCCESS) with a verdict naming the most common error kind and the setting that "
            "usually causes it: such a run did nothing useful, whatever its count check says. 1 turns the "
            "verdict off. A rerun with corrected settings to the same output starts over."
        ),
    )


class SectionedConfig(BaseModel):
    """A config of sections (the job's, the export's): loaded from YAML, CLI flags and ``--set``."""

    model_config = ConfigDict(extra="forbid")

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate a plain mapping; errors are raised as :class:`ConfigError` naming every bad key."""
        try:
            return cls.model_validate(_drop_empty_sections(cls, dict(data)))
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, cls)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Load and validate a YAML file."""
        return cls.from_dict(_load_yaml_file(path))

    @classmethod
    def from_sources(
        cls,
        config_file: str | Path | None,
        overrides: Sequence[str] = (),
        **flags: Any,
    ) -> Self:
        """Build a configuration the way the CLI does.

        Precedence, lowest first: the YAML ``config_file`` (optional), then ``flags``, then ``overrides``.

        ``flags`` are the CLI's shortcuts, named ``<section>_<field>`` (``input_uri``, ``output_uri``,
        ``model_source``, ``runtime_ray_address`` ...); a flag whose value is ``None`` was not given and
        is skipped.

        ``overrides`` are ``--set`` strings ``a.b=c``: a dotted path into the sections and a value parsed
        as YAML, so ``12``, ``0.5``, ``true``, ``null`` and ``[a, b]`` get their types. A field that only
        takes text (``model.system_message``, ``input.uri`` ...) keeps the raw string, so
        ``--set model.system_message=Note: yes`` is the string it looks like; ``null`` (or nothing after
        ``=``) still means null there, and quoting (``'null'``) gives the literal text. A path that names no
        field is an error naming the bad key.
        """
        data: dict[str, Any] = _load_yaml_file(config_file) if config_file is not None else {}
        data = _drop_empty_sections(cls, data)
        for name, value in flags.items():
            if value is None:
                continue
            path = _flag_path(cls, name)
            _set_path(data, path, value)
        for override in overrides:
            path, value = _parse_override(cls, override)
            _set_path(data, path, value)
        return cls.from_dict(data)


class JobConfig(SectionedConfig):
    """A whole scoring job. Build it with :meth:`from_yaml` or :meth:`from_sources`."""

    model_config = ConfigDict(extra="forbid")

    input: InputConfig = Field(
        ..., description="Where the rollouts are read from and how their columns are named."
    )
    images: ImagesConfig = Field(
        default_factory=ImagesConfig, description="How images are located and the limits that guard decoding."
    )
    model: ModelConfig = Field(..., description="The VisualPRM checkpoint and how it is loaded.")
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How conversations are built and batched for the reward model.",
    )
    output: OutputConfig = Field(
        ..., description="Where the scores are written and how an existing output is treated."
    )
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Ray: where to run, how many actors, and the error policy."
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="Object-store options shared by the input, model and output.",
    )

    @model_validator(mode="after")
    def _output_is_not_input(self) -> JobConfig:
        if self.output.uri.rstrip("/") == self.input.uri.rstrip("/"):
            raise ValueError(f"output.uri must differ from input.uri (both are {self.input.uri!r})")
        return self

    # ---------------------------------------------------------------------------------------- writing

    def to_yaml(self) -> str:
        """The full resolved configuration as YAML (every field, defaults included); loads back equal."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def redacted_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data for the run manifest, with every string redacted.

        No credentials belong in the configuration, but a URI can carry them (``s3://key:secret@...``), so
        each string goes through :func:`visualprm_ray.storage.redact` when that function exists.
        """
        data = self.model_dump(mode="json")
        try:
            from visualprm_ray.storage import redact
        except ImportError:
            return data
        return _map_strings(data, redact)


# -------------------------------------------------------------------------------------------- helpers


def _load_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class if ``annotation`` is a (sub)section, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _drop_empty_sections(model_cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``images:`` with nothing under it (YAML null) means "all defaults", not "images is null"."""
    out = dict(data)
    for name, field in model_cls.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is None or name not in out:
            continue
        if out[name] is None:
            del out[name]
        elif isinstance(out[name], dict):
            out[name] = _drop_empty_sections(sub, out[name])
    return out


def _valid_keys(model_cls: type[BaseModel]) -> str:
    return ", ".join(model_cls.model_fields)


def _resolve_path(model_cls: type[BaseModel], parts: Sequence[str], origin: str) -> Any:
    """Check a dotted path against the schema; return the annotation of the field it names."""
    current: type[BaseModel] = model_cls
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "top level"
        if part not in current.model_fields:
            raise ConfigError(
                f"{origin}: unknown key {'.'.join(parts[: i + 1])!r} "
                f"(valid keys at {where}: {_valid_keys(current)})"
            )
        annotation = current.model_fields[part].annotation
        sub = _section_model(annotation)
        if i == len(parts) - 1:
            return annotation
        if sub is None:
            raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        current = sub
    raise ConfigError(f"{origin}: empty key")  # pragma: no cover - parts is never empty here


def _flag_path(model_cls: type[BaseModel], name: str) -> list[str]:
    """``input_uri`` -> ``["input", "uri"]``: the longest section name that prefixes the flag."""
    for section in sorted(model_cls.model_fields, key=len, reverse=True):
        if name.startswith(section + "_") and _section_model(model_cls.model_fields[section].annotation):
            path = [section, name[len(section) + 1 :]]
            _resolve_path(model_cls, path, f"flag {name!r}")
            return path
    raise ConfigError(
        f"unknown flag {name!r}: expected <section>_<field> with a section among {_valid_keys(model_cls)}"
    )


_NULL_WORDS = {"", "~", "null", "Null", "NULL"}


def _text_only(annotation: Any) -> tuple[bool, bool]:
    """Whether a field takes only text (str or string Literals), and whether it also takes None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        non_none = [a for a in args if a is not type(None)]
        allows_none = len(non_none) != len(args)
        return all(_text_only(a)[0] for a in non_none), allows_none
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation)), False
    return annotation is str, False


def _parse_override(model_cls: type[BaseModel], override: str) -> tuple[list[str], Any]:
    origin = f"--set {override}"
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{origin}: expected KEY=VALUE with a dotted KEY such as scoring.max_steps=8")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{origin}: malformed key {key!r}")
    annotation = _resolve_path(model_cls, parts, origin)
    text_only, allows_none = _text_only(annotation)
    stripped = raw.strip()
    quoted = len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\""
    if text_only and not quoted:
        if allows_none and stripped in _NULL_WORDS:
            return parts, None
        return parts, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: the value is not valid YAML: {exc}") from None
    return parts, value


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"cannot set {'.'.join(path)!r}: {'.'.join(path[: i + 1])!r} is "
                f"{type(child).__name__} in the config, not a section"
            )
        node = child
    node[path[-1]] = value


def _format_validation_error(exc: ValidationError, model_cls: type[BaseModel]) -> str:
    problems: dict[str, list[str]] = {}  # key -> messages, in order; a union field fails once per branch
    for err in exc.errors(include_url=False):
        # Walk the error location through the schema: the part naming fields is the key the user wrote;
        # the rest (union branch tags, list indices) is detail.
        current: type[BaseModel] | None = model_cls
        names: list[str] = []
        detail: list[str] = []
        for part in err["loc"]:
            if current is not None and isinstance(part, str) and part in current.model_fields:
                names.append(part)
                current = _section_model(current.model_fields[part].annotation)
            else:
                detail.append(str(part))
                current = None
        key = ".".join(names) or "top level"
        if err["type"] == "extra_forbidden":
            bad = ".".join([*names, *detail])
            section = ".".join(names) or "top level"
            valid = _valid_keys(_walk(model_cls, names))
            problems.setdefault(bad, []).append(f"unknown key (valid keys at {section}: {valid})")
        elif err["type"] == "missing":
            problems.setdefault(key, []).append("required, but not set")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if names and not isinstance(got, (dict, BaseModel)):
                msg = f"{msg} (got {got!r})"
            problems.setdefault(key, []).append(msg)
    lines = [f"  {key}: {'; or: '.join(dict.fromkeys(msgs))}" for key, msgs in problems.items()]
    return "invalid configuration:\n" + "\n".join(lines)


def _walk(model_cls: type[BaseModel], names: Sequence[str]) -> type[BaseModel]:
    current = model_cls
    for name in names:
        sub = _section_model(current.model_fields[name].annotation)
        if sub is None:
            break
        current = sub
    return current


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ docs


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe_fields(model_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows ``(dotted name, type, default, description)`` for every field, recursing into sections.

    A section contributes its fields, not a row of its own. A required field's default reads ``required``.
    """
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model_cls.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_model(field.annotation)
        if sub is not None:
            rows.extend(describe_fields(sub, prefix=dotted + "."))
            continue
        default = (
            "required" if field.is_required() else _default_text(field.get_default(call_default_factory=True))
        )
        rows.append((dotted, _type_name(field.annotation), default, field.description or ""))
    return rows


def render_fields(fmt: Literal["table", "yaml"] = "table") -> str:
    """Every config field with its type, default and description (``visualprm-ray config``).

    ``table``: one entry per ``section.key`` (:func:`describe_fields`); ``yaml``: a commented
    starting config with every default written out and the required values marked.
    """
    import json

    if fmt == "table":
        lines = []
        for dotted, type_name, default, description in describe_fields(JobConfig):
            lines += [f"{dotted}  [{type_name}] = {default}", f"    {description}"]
        return "\n".join(lines) + "\n"
    lines = [
        "# visualprm-ray job config: every field with its default (`visualprm-ray config --format yaml`).",
        "# Precedence: this file < --input/--output/--model < --set section.key=value.",
    ]
    for section, section_field in JobConfig.model_fields.items():
        lines += ["", f"# {section_field.description}", f"{section}:"]
        for key, f in section_field.annotation.model_fields.items():
            lines.append(f"  # {f.description} ({_type_name(f.annotation)})")
            if f.is_required():
                lines.append(f"  {key}: null  # required")
            else:
                lines.append(f"  {key}: {json.dumps(f.get_default(call_default_factory=True), default=str)}")
    return "\n".join(lines) + "\n"
