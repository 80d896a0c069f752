"""Filesystems, URIs and the per-node model download cache.

A batch job reads Parquet from local paths, ``s3://``, ``gs://`` or any other protocol whose fsspec
package is installed, writes Parquet back, and loads a model directory that may live in object
storage. Everything here goes through fsspec so that there is one code path for every protocol,
and so that S3 honours the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables the
same way for reads, writes and model downloads (botocore reads them).

Heavy imports (pyarrow, fsspec, s3fs, botocore) happen inside functions: importing this module
must stay instant because the CLI imports it to print ``--help``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Only what loading a checkpoint needs. Anything else (``*.py`` in particular: checkpoint code is
# never fetched, let alone executed; also optimizer states, ``*.bin`` duplicates) is skipped.
MODEL_FILE_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "tokenizer.model", "*.txt")
# What preparing a group needs (config and tokenizer, no weights): CPU nodes fetch only these.
PREPROCESSING_PATTERNS: tuple[str, ...] = ("*.json", "tokenizer.model", "*.txt")

MARKER_NAME = ".complete.json"
_MARKER_VERSION = 1

# Characters that make fsspec treat a path as a glob.
_GLOB_CHARS = ("*", "?", "[")


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries), or a model source cannot be used."""


class ModelChangedError(StorageError):
    """A model's files are not the ones the job was started with (it is pinned for the whole job)."""


def describe_listing_change(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> str:
    """What differs between two model listings, in words (at most a few names of each kind)."""
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = sorted(k for k in set(before) & set(now) if before[k] != now[k])
    parts = [
        f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        for what, names in (("changed", changed), ("added", added), ("removed", removed))
        if names
    ]
    return "the model's files differ from the ones the job was started with: " + "; ".join(parts)


class StorageOptions(BaseModel):
    """How to reach object storage.

    Credentials are deliberately NOT fields: they come from the environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    ``GOOGLE_APPLICATION_CREDENTIALS``) or from the cluster identity (instance profile, IRSA,
    workload identity). A config object gets logged, written into manifests and shipped to every
    Ray worker; keeping secrets out of it means they cannot leak that way.
    """

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        default=None,
        description=(
            "S3-compatible endpoint (MinIO, Ceph, R2, a local test server). When None, botocore "
            "applies the standard AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 environment variables."
        ),
    )
    anon: bool = Field(default=False, description="Anonymous (unsigned) access, for public buckets.")
    region: str | None = Field(
        default=None, description="S3 region; None lets botocore resolve it (AWS_DEFAULT_REGION, config)."
    )
    retries: int = Field(
        default=5,
        ge=0,
        description="Retries with exponential backoff on transient errors, for reads, writes and downloads.",
    )


# --------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``uri`` into ``(protocol, path)``.

    Local paths (absolute or relative, with or without a ``file://`` prefix) give ``"file"`` and
    the path as written (made absolute by :func:`fsspec_filesystem`, not here, so that this stays
    a pure string function). Remote URIs give the lower-cased scheme and the rest, e.g.
    ``("s3", "bucket/key")``.
    """
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return "file", rest
    return scheme, rest


def _is_local(uri: str) -> bool:
    return split_uri(uri)[0] == "file"


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _effective_endpoint(options: StorageOptions) -> str | None:
    """The S3 endpoint botocore will use (explicit option first, then the standard env variables)."""
    return options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def fsspec_filesystem(
    uri: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)``: an fsspec filesystem for the URI's protocol and the path it expects.

    The path is ``bucket/key`` for S3-like stores and an absolute path for local files. Only the
    options that are set are passed to s3fs, so unset ones keep botocore's own resolution (env
    variables, config files, instance metadata).
    """
    import fsspec

    options = options or StorageOptions()
    protocol, path = split_uri(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), _local_path(path)
    if protocol in ("s3", "s3a"):
        import s3fs

        kwargs: dict[str, Any] = {}
        if options.anon:
            kwargs["anon"] = True
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
        if options.region:
            kwargs["client_kwargs"] = {"region_name": options.region}
        fs = s3fs.S3FileSystem(**kwargs)
    else:
        # gs://, az://, hf://, memory://, ...: whatever fsspec knows; the S3 options do not apply.
        try:
            fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"no filesystem for {protocol}:// ({exc})") from exc
    return fs, fs._strip_protocol(f"{protocol}://{path}").rstrip("/")


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """Return ``(pyarrow filesystem, path)`` for ``ray.data.read_parquet``/``write_parquet(filesystem=...)``.

    Remote protocols wrap the fsspec filesystem (``PyFileSystem(FSSpecHandler(fs))``) rather than
    using pyarrow's native S3 client: one code path for every protocol fsspec knows, and the same
    endpoint/credential resolution (``AWS_ENDPOINT_URL`` included) as the rest of this module.
    """
    import pyarrow.fs

    if _is_local(uri):
        return pyarrow.fs.LocalFileSystem(), _local_path(split_uri(uri)[1])
    fs, path = fsspec_filesystem(uri, options)
    protocol = split_uri(uri)[0]
    retries = (options or StorageOptions()).retries
    handler = _retrying_writes_class()(fs, protocol=protocol, retries=retries)
    return pyarrow.fs.PyFileSystem(handler), path


@functools.cache
def _retrying_writes_class():
    # Built on first use: pyarrow.fs is only imported by code that touches data.
    import pyarrow.fs

    class RetryingWrites(pyarrow.fs.FSSpecHandler):
        """fsspec behind pyarrow, with every written file uploaded in one retried call.

        Ray Data's writer streams into ``open_output_stream`` and only retries pyarrow's native
        S3 errors; through fsspec a throttled or failing upload would surface as a bare
        ``OSError`` naming no file. Buffering the file (output files are score tables, small) and
        uploading it with :func:`with_retries` on close gives writes the same backoff as reads and,
        when the store keeps failing, a :class:`StorageError` naming the object.
        """

        def __init__(self, fs, *, protocol: str, retries: int) -> None:
            super().__init__(fs)
            self.protocol = protocol
            self.retries = retries

        def open_output_stream(self, path, metadata):
            from pyarrow import PythonFile

            return PythonFile(_UploadOnClose(self.fs, path, self.protocol, self.retries), mode="w")

    return RetryingWrites


class _UploadOnClose(io.BytesIO):
    def __init__(self, fs, path: str, protocol: str, retries: int) -> None:
        super().__init__()
        self._fs, self._path, self._protocol, self._retries = fs, path, protocol, retries

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            with_retries(
                lambda: self._fs.pipe_file(self._path, data),
                what=f"write {_join_uri(self._protocol, self._path)}",
                retries=self._retries,
            )


def _join_uri(protocol: str, path: str) -> str:
    # Local results stay plain absolute paths: that is what LocalFileSystem, open() and torch want.
    return path if protocol == "file" else f"{protocol}://{path}"


# --------------------------------------------------------------------------------------------
# Reading what is used, no more
# --------------------------------------------------------------------------------------------

# Files scanned at once by the driver's bookkeeping (footers, the count check, resume). Each file
# costs one or two requests, one after the other; many files at once turn F files' round trips
# into F / SCAN_THREADS of them.
SCAN_THREADS = 64


def open_for_read(uri: str, options: StorageOptions | None = None, *, size: int | None = None):
    """A file object that fetches exactly the byte ranges read from it, nothing ahead.

    fsspec's object-store files read ahead in large blocks by default (50 MiB on s3fs), and look
    the object up (a HEAD) before their first read: reading the small ``responses`` column of a
    big file fetched most of the file. Here every ``read`` is one ranged GET of what was asked,
    and a known ``size`` (from a listing) spares the HEAD. Parquet readers coalesce adjacent
    column chunks themselves (``pre_buffer``), so a row group's columns still come in a request
    or two.
    """
    fs, path = fsspec_filesystem(uri, options)
    if _is_local(uri):
        return open(path, "rb")
    return RangeFile(fs, path, fs.size(path) if size is None else size)


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote object where each read is one ``cat_file`` range."""

    def __init__(self, fs, path: str, size: int) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._pos = fs, path, int(size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        data = self._fs.cat_file(self._path, start=self._pos, end=end)
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_range(uri: str, options: StorageOptions | None = None, *, end: int | None = None) -> bytes:
    """The first ``end`` bytes of a file (all of it when ``end`` is None), in one request."""
    fs, path = fsspec_filesystem(uri, options)
    if end is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=0, end=end)


class TornFile(ValueError):
    """A Parquet file that cannot be opened: no footer (a writer killed mid-file), zero bytes."""


def read_parquet(
    uri: str,
    columns: list[str] | None,
    options: StorageOptions | None = None,
    *,
    size: int | None = None,
    metadata: Any = None,
    row_groups: list[int] | None = None,
    missing_columns: Literal["error", "skip"] = "error",
):
    """``columns`` of one Parquet file (of some ``row_groups`` of it), fetching only their column chunks.

    ``missing_columns="skip"`` reads those of ``columns`` the file has (a reader that checks what
    is missing across files itself); ``"error"`` lets pyarrow refuse the file.

    With the file's ``metadata`` (its footer, read before) nothing but the column chunks is
    fetched; with its ``size`` not even a HEAD. Transient errors are retried; a file that is not
    valid Parquet raises :class:`TornFile` (a network error never does: a good file is never taken
    for a torn one because of a bad connection).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    options = options or StorageOptions()

    def read():
        with open_for_read(uri, options, size=size) as f:
            try:
                parquet = pq.ParquetFile(f, metadata=metadata, pre_buffer=True)
            except pa.ArrowInvalid as exc:
                raise TornFile(f"{redact(uri)} is not a complete Parquet file: {exc}") from None
            with parquet:
                wanted = columns
                if columns is not None and missing_columns == "skip":
                    wanted = [c for c in columns if c in parquet.schema_arrow.names]
                if row_groups is not None:
                    return parquet.read_row_groups(row_groups, columns=wanted)
                return parquet.read(columns=wanted)

    return with_retries(read, what=f"read {redact(uri)}", retries=options.retries)


def parallel_map(fn: Callable[[int], T], count: int, *, threads: int = SCAN_THREADS) -> list[T]:
    """``[fn(0), ..., fn(count - 1)]``, many at once (I/O-bound work: one thread per request in flight)."""
    return list(parallel_imap(fn, count, threads=threads))


def parallel_imap(fn: Callable[[int], T], count: int, *, threads: int = SCAN_THREADS) -> Iterator[T]:
    """``fn(0), ..., fn(count - 1)`` in order, as they finish, with at most ``threads`` running or
    waiting to be taken: the caller reduces each result (in its own thread) before more are read.

    Why not reduce in the worker threads: each thread's temporaries stay in that thread's arena of
    the C allocator once freed, so 32 threads that hash and filter hold ~10 MB each for good; the
    reading itself (pyarrow, GIL released) is what needs the threads.
    """
    if count <= 1:
        yield from (fn(i) for i in range(count))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, count), thread_name_prefix="visualprm-io") as pool:
        pending = deque(pool.submit(fn, i) for i in range(min(threads, count)))
        submitted = len(pending)
        try:
            while pending:
                result = pending.popleft().result()
                if submitted < count:
                    pending.append(pool.submit(fn, submitted))
                    submitted += 1
                yield result
        finally:
            for future in pending:  # an error (or a caller that stopped): do not read the rest
                future.cancel()


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------

# userinfo in a URL (``https://user:pass@host``, ``https://token@host``): the part before ``@``
# in the authority may be a credential either way. No ``/`` allowed, so ``s3://b/k@x`` is kept.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@")
# Access key ids: AKIA (long-term) / ASIA (temporary), 16+ characters in all.
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")
# ``key=value``, ``key: value``, ``"key": "value"``, ``'key': 'value'`` where the key ENDS in a
# secret-ish word. Anchoring at the end keeps ordinary config readable: ``max_new_tokens: 512`` and
# ``tokenizer_path=...`` are not secrets, ``aws_session_token=...`` and ``X-Amz-Signature=`` are.
_SECRET_PAIR = re.compile(
    r"""(?ix)
    (?P<key>["']?[\w.\-]*?
        (?:secret_access_key|secret_key|secret|session_token|token|password|passwd
           |api_key|apikey|private_key|signature|credentials?)
    ["']?)
    (?P<sep>\s*[=:]\s*)
    (?P<value>"[^"]*"|'[^']*'|[^\s"',;&}\])]+)
    """
)
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")


def _redact_pair(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{match.group('sep')}{quote}***{quote}"


def redact(text: str) -> str:
    """Replace anything that looks like a credential in ``text`` with ``***``.

    Applied to every log line and manifest that can contain config or exception text (botocore
    messages and fsspec reprs can echo URLs, keys and tokens). Errs on the side of redacting.
    """
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_PAIR.sub(_redact_pair, text)
    text = _AUTH_HEADER.sub(r"\1 ***", text)
    return _AWS_KEY_ID.sub("***", text)


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------

_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
# OSError subclasses that describe the request, not the network: retrying cannot help.
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    try:
        # Imported only on the error path: botocore is heavy and may not be installed at all.
        from botocore import exceptions as bexc
    except ImportError:
        return False
    if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
        return True  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ...
    if isinstance(exc, bexc.ClientError):
        response = exc.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _THROTTLING_CODES or int(status) >= 500 or int(status) == 429 or code.startswith("5")
    return False


def with_retries(fn: Callable[[], T], *, what: str, retries: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn()``, retrying transient errors with exponential backoff and jitter.

    Object stores fail transiently all the time at cluster scale (throttling when hundreds of Ray
    tasks start at once, dropped connections); a batch job should ride over that instead of
    losing hours of work. Errors that retrying cannot fix (missing file, access denied, bugs)
    propagate unchanged on the first try. After ``retries`` retries a :class:`StorageError`
    naming ``what`` is raised from the last error (message redacted).
    """
    attempts = max(0, retries) + 1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            message = redact(f"{type(exc).__name__}: {exc}")
            if attempt + 1 >= attempts:
                raise StorageError(f"{redact(what)}: failed after {attempts} attempt(s): {message}") from exc
            # Full-range jitter de-synchronises many workers that failed at the same moment.
            delay = min(30.0, base_delay * (2**attempt)) * random.uniform(0.5, 1.5)
            logger.warning(
                "%s: transient error (attempt %d/%d), retrying in %.2fs: %s",
                redact(what),
                attempt + 1,
                attempts,
                delay,
                message,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def _hidden(relative: str) -> bool:
    # ``_SUCCESS``, ``_temporary/``, ``.tmp``, ``.ipynb_checkpoints/``: writer bookkeeping, not data.
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_files(
    uri: str,
    options: StorageOptions | None = None,
    suffix: str = ".parquet",
    *,
    recursive: bool = True,
    detail: bool = False,
) -> list[Any]:
    """Sorted full URIs of the data files at ``uri`` (with ``detail``: ``(uri, size, version)``).

    ``uri`` may be a directory/prefix (searched recursively), a glob (``s3://b/data/*.parquet``)
    or a single file (returned as is). Names ending in ``suffix`` are kept (``""`` keeps all);
    any name or directory starting with ``_`` or ``.`` below the root is skipped (``_SUCCESS``,
    ``.tmp``, ``_temporary/``). Remote results carry their protocol (``s3://bucket/key``); local
    ones are absolute paths. A non-glob ``uri`` that does not exist raises ``FileNotFoundError``
    so a typo fails loudly instead of producing an empty job. ``recursive=False`` keeps only the
    files directly in a directory: a job's output, where nested files are never the job's.

    One listing call per 1,000 objects on S3, whatever the form: sizes and versions (ETag, or
    mtime for local files) come with the listing, never from a request per file.
    """
    options = options or StorageOptions()
    protocol = split_uri(uri)[0]
    fs, path = fsspec_filesystem(uri, options)

    def _list() -> dict[str, dict[str, Any]]:
        # s3fs caches listings per instance (and instances are shared): a prefix listed before a
        # write would otherwise look unchanged after it.
        fs.invalidate_cache()
        if any(ch in path for ch in _GLOB_CHARS):
            first = min(path.index(ch) for ch in _GLOB_CHARS if ch in path)
            root = path[: path.rfind("/", 0, first) + 1]
            found = fs.glob(path, detail=True)
            return {
                p: info
                for p, info in found.items()
                if info.get("type") == "file" and not _hidden(p[len(root) :])
            }
        prefix = path.rstrip("/") + "/"
        # The listing first (one request per 1,000 keys on S3); only when it finds nothing is the
        # path looked up itself (a single file, an empty directory, or nothing at all).
        try:
            if not recursive:
                below = {e["name"]: e for e in fs.ls(path, detail=True) if e.get("type") == "file"}
            else:
                below = fs.find(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            below = {}
        if not any(p.startswith(prefix) for p in below):
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no such file or directory", redact(uri)) from None
            if info.get("type") == "file":
                return {path: info}
        # find() on s3 may include an object named exactly like the prefix; keep what is below it.
        return {
            p: e
            for p, e in below.items()
            if p.startswith(prefix) and e.get("type") != "directory" and not _hidden(p[len(prefix) :])
        }

    found = with_retries(_list, what=f"list {redact(uri)}", retries=options.retries)
    keep = sorted(p for p in found if p.endswith(suffix or ""))
    if not detail:
        return [_join_uri(protocol, p) for p in keep]
    return [(_join_uri(protocol, p), int(found[p].get("size") or 0), _version(found[p])) for p in keep]


def _version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: its ETag (S3), md5/generation (GCS), else mtime."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return ""


# --------------------------------------------------------------------------------------------
# Model download cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$VISUALPRM_CACHE``, else ``~/.cache/visualprm-ray/models``."""
    env = os.environ.get("VISUALPRM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visualprm-ray" / "models"


def _wanted(relative: str, patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return not _hidden(relative) and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _cache_name(uri: str, endpoint: str | None) -> str:
    # The hash makes the name unique per source; the endpoint is part of the identity (the same
    # bucket/key on MinIO and on AWS are different models). The tail keeps ``ls`` readable.
    digest = hashlib.sha256(f"{uri}\n{endpoint or ''}".encode()).hexdigest()[:20]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:64].strip("._") or "model"
    return f"{tail}-{digest}"


def _remote_listing(
    fs: fsspec.AbstractFileSystem, root: str, patterns: tuple[str, ...] = MODEL_FILE_PATTERNS
) -> dict[str, dict[str, Any]]:
    """``relative name -> {"size": int, "etag": str | None}`` for the model files under ``root``."""
    # s3fs lists afresh in find(), but other fsspec filesystems may answer from their listing cache,
    # which would hide a changed remote.
    fs.invalidate_cache()
    prefix = root.rstrip("/") + "/"
    listing: dict[str, dict[str, Any]] = {}
    for full, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory" or not full.startswith(prefix):
            continue
        relative = full[len(prefix) :]
        if not _wanted(relative, patterns):
            continue
        # Object keys are arbitrary strings: refuse anything that would land outside the cache dir.
        if any(part in ("", ".", "..") for part in relative.split("/")):
            raise StorageError(f"refusing unsafe file name in model listing: {relative!r}")
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        listing[relative] = {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None}
    return listing


def _read_marker(target: Path) -> dict[str, dict[str, Any]] | None:
    try:
        data = json.loads((target / MARKER_NAME).read_text())
        files = data["files"]
        if data.get("version") != _MARKER_VERSION or not isinstance(files, dict):
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local_files_match(target: Path, files: dict[str, dict[str, Any]]) -> bool:
    """Cheap integrity check: every file exists with the recorded size (catches partial copies,
    truncation and deletions; no hashing, so it costs one stat per file)."""
    for relative, meta in files.items():
        try:
            if (target / relative).stat().st_size != meta["size"]:
                return False
        except OSError:
            return False
    return True


def _download_tree(
    fs: fsspec.AbstractFileSystem,
    root: str,
    listing: dict[str, dict[str, Any]],
    dest: Path,
    *,
    uri: str,
    retries: int,
) -> None:
    """Download every file of ``listing`` below ``dest``, verifying each size against the listing."""
    for relative, meta in sorted(listing.items()):
        local = dest / relative
        local.parent.mkdir(parents=True, exist_ok=True)

        def _fetch(relative: str = relative, local: Path = local, size: int = meta["size"]) -> None:
            fs.get_file(f"{root}/{relative}", str(local))
            got = local.stat().st_size
            if got != size:
                # A short read is a transient failure: raise an OSError so with_retries fetches again.
                raise OSError(errno.EIO, f"size mismatch for {relative}: got {got} bytes, expected {size}")

        with_retries(_fetch, what=f"download {redact(uri)}/{relative}", retries=retries)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when the process dies, so a crashed download cannot leave a
    # stale lock behind. The lock file itself is never deleted: unlinking it while another process
    # waits on it would let two processes hold "the" lock at once.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remote_model_listing(source: str, options: StorageOptions | None = None) -> dict[str, dict[str, Any]]:
    """The model files under a remote prefix: ``relative name -> {"size", "etag"}`` (one listing)."""
    options = options or StorageOptions()
    protocol, _ = split_uri(source)
    fs, root = fsspec_filesystem(source, options)
    uri = _join_uri(protocol, root)
    listing = with_retries(
        lambda: _remote_listing(fs, root), what=f"list {redact(uri)}", retries=options.retries
    )
    if not listing:
        raise StorageError(
            f"no model files ({', '.join(MODEL_FILE_PATTERNS)}) found at {redact(uri)}: "
            "the path does not exist or holds no checkpoint"
        )
    return listing


def local_model_files(directory: Path, patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> list[str]:
    """The model files of a local checkpoint directory (those ``patterns`` keep), sorted."""
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and _wanted(relative, patterns):
            found.append(relative)
    return sorted(found)


def local_model_dir(
    source: str,
    options: StorageOptions | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    expected: dict[str, dict[str, Any]] | None = None,
    patterns: tuple[str, ...] = MODEL_FILE_PATTERNS,
) -> Path:
    """A local directory holding the model at ``source``.

    A local directory is returned as is. A remote URI (``s3://...`` or any fsspec protocol) is
    downloaded once per node into ``cache_dir`` (default :func:`default_cache_dir`), safely when
    many Ray actors start at once: they serialise on an ``fcntl.flock`` next to the target, the
    first one downloads into a temporary sibling, verifies every size, writes a ``.complete.json``
    marker with the remote listing and renames the directory into place; the others then find a
    valid cache. Every call compares the remote listing (names, sizes, ETags) with the marker and
    the local sizes with the marker, and refetches when the cache is partial, corrupt or stale.
    If the remote cannot be listed but a complete cache exists, the cache is used (with a
    warning) so that a flaky store does not take down a job whose model is already on the node.

    Only ``*.json``, ``*.safetensors``, ``tokenizer.model`` and ``*.txt`` are fetched; checkpoint
    code (``*.py``) is never downloaded. A hub id (no ``://`` and not an existing path) is not
    handled here: it raises :class:`StorageError` so the caller can try the hub.

    ``expected`` pins the model for a job: the listing the driver saw when the job started. A remote
    that lists differently (a retrained checkpoint uploaded to the same prefix mid-run) raises
    :class:`ModelChangedError` instead of fetching other weights than the job was started with; a
    cached copy is used only when its own listing is the expected one.

    ``patterns`` narrows what is fetched (:data:`PREPROCESSING_PATTERNS`: no weights, for nodes that
    only tokenize); such a partial copy has a cache entry of its own, and ``expected`` is compared
    on the files it keeps.
    """
    options = options or StorageOptions()
    if _is_local(source):
        path = Path(split_uri(source)[1]).expanduser()
        if path.is_dir():
            return path
        if path.exists():
            raise StorageError(f"model path is not a directory: {redact(source)}")
        raise StorageError(f"model path does not exist: {redact(source)}")

    protocol, _ = split_uri(source)
    fs, root = fsspec_filesystem(source, options)
    uri = _join_uri(protocol, root)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = _cache_name(uri, _effective_endpoint(options) if protocol in ("s3", "s3a") else None)
    if patterns != MODEL_FILE_PATTERNS:
        name += "-" + hashlib.sha256(repr(sorted(patterns)).encode()).hexdigest()[:8]
    if expected is not None:
        expected = {k: v for k, v in expected.items() if _wanted(k, patterns)}
    target = cache / name

    with exclusive_lock(cache / f"{name}.lock"):
        # Leftovers of a process that died mid-download: nobody else can be writing them, we hold the lock.
        for stale in cache.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        marker = _read_marker(target)
        cache_ok = marker is not None and _local_files_match(target, marker)
        if expected is not None and marker is not None and marker != expected:
            cache_ok = False  # another version than the job's: never used for it
        try:
            listing = with_retries(
                lambda: _remote_listing(fs, root, patterns),
                what=f"list {redact(uri)}",
                retries=options.retries,
            )
        except (StorageError, OSError) as exc:
            if cache_ok and not isinstance(exc, (FileNotFoundError, PermissionError)):
                logger.warning("cannot list %s, using the cached copy at %s: %s", redact(uri), target, exc)
                return target
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot list model at {redact(uri)}: {redact(str(exc))}") from exc
        if not listing:
            raise StorageError(
                f"no model files ({', '.join(MODEL_FILE_PATTERNS)}) found at {redact(uri)}: "
                "the path does not exist or holds no checkpoint"
            )
        if expected is not None and listing != expected:
            raise ModelChangedError(f"{redact(uri)}: {describe_listing_change(expected, listing)}")
        if cache_ok and marker == listing:
            return target
        if marker is not None:
            why = "remote changed" if marker != listing else "local copy is partial or corrupt"
            logger.warning("refetching %s into %s: %s", redact(uri), target, why)

        tmp = cache / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _download_tree(fs, root, listing, tmp, uri=uri, retries=options.retries)
            (tmp / MARKER_NAME).write_text(
                json.dumps(
                    {"version": _MARKER_VERSION, "uri": redact(uri), "files": listing},
                    indent=1,
                    sort_keys=True,
                )
            )
            # rename() cannot replace a non-empty directory: move the old copy aside first. Both
            # steps are atomic renames on one filesystem, and readers only look under the lock.
            old = None
            if target.exists():
                old = cache / f".{name}.tmp-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("downloaded %s (%d files) into %s", redact(uri), len(listing), target)
        return target
