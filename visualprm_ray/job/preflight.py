"""What a job checks before Ray starts: the model, the input and the output, in that order.

Each problem a newcomer meets (a typo in a path, a bucket without credentials, an output under a
file, a hub id that is really a local path) becomes one :class:`SetupError` line that names the
thing, says what is wrong and what to set; the CLI prints it and exits 2 (``--debug`` shows the
traceback). The output is written to only once the model and the input are known good: a failed
first contact leaves nothing behind that a corrected rerun would trip over.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.model.source import ModelIdentity

MODEL_FORMS = (
    "a local checkpoint directory, an s3://... or gs://... prefix, or a hub id (OpenGVLab/VisualPRM-8B)"
)
PROBE = "_visualprm_write_probe"


class SetupError(RuntimeError):
    """The input, the output, the model or the storage cannot be used as configured (one line)."""


def storage_problem(exc: BaseException, uri: str) -> str | None:
    """What a storage exception means for ``uri``, in words a user can act on; None if unknown."""
    from visualprm_ray.storage import StorageError, redact

    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        text = redact(str(seen))
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
            return (
                f"no credentials for {redact(uri)}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), or run where the node has a role; storage.anon=true reads a public bucket"
            )
        if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or "InvalidAccessKeyId" in text:
            return f"the credentials in the environment are not valid for {redact(uri)} ({text})"
        if isinstance(seen, PermissionError) and "://" not in uri:
            return f"permission denied for {uri} ({seen.strerror or text})"
        if isinstance(seen, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            return f"access denied to {redact(uri)}: the credentials in use may not read or write it"
        if name in ("EndpointConnectionError", "ConnectTimeoutError") or isinstance(seen, StorageError):
            return (
                f"cannot reach the object store for {redact(uri)} ({text}); check storage.endpoint_url "
                "or AWS_ENDPOINT_URL and the network"
            )
        if "NoSuchBucket" in text:
            return f"the bucket of {redact(uri)} does not exist"
        seen = seen.__cause__ or seen.__context__
    return None


def _near(path: str) -> str:
    """`` (did you mean ...?)`` for a local path whose parent exists and holds a similar name."""
    parent, name = os.path.split(os.path.abspath(os.path.expanduser(path.rstrip("/"))))
    if not os.path.isdir(parent):
        missing = parent
        while missing and not os.path.isdir(os.path.dirname(missing)):
            missing = os.path.dirname(missing)
        return f" ({missing} does not exist)" if missing else ""
    close = difflib.get_close_matches(name, sorted(os.listdir(parent)), n=1, cutoff=0.6)
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def _looks_local(source: str) -> bool:
    """A source that is meant as a path: absolute, relative with ./ or ../, or whose first
    component exists here (``models/tiny-prn`` beside a ``models/`` directory)."""
    if source.startswith(("/", "./", "../", "~")) or (os.sep == "\\" and ":" in source[:3]):
        return True
    first = source.split("/", 1)[0]
    return "/" not in source or os.path.isdir(first)


def check_model(config: JobConfig) -> ModelIdentity:
    """The model's identity, and its config and tokenizer loaded once on the driver: a checkpoint
    the job cannot score is refused here, not after every actor has failed to start."""
    from visualprm_ray.model.checkpoint import CheckpointError, load_preprocessing
    from visualprm_ray.model.source import ModelIdentityError, model_identity, preprocessing_directory
    from visualprm_ray.model.tokenizer import TokenizerError
    from visualprm_ray.storage import StorageError, redact

    source = str(config.model.source)
    shown = redact(source)
    if "://" not in source and not Path(source).expanduser().is_dir() and _looks_local(source):
        raise SetupError(f"model: {shown} is not a directory{_near(source)}; --model takes {MODEL_FORMS}")
    try:
        identity = model_identity(source, storage=config.storage, cache_dir=config.model.cache_dir)
    except FileNotFoundError:
        raise SetupError(f"model: nothing at {shown}; --model takes {MODEL_FORMS}") from None
    except (ModelIdentityError, StorageError, OSError) as exc:
        raise SetupError(f"model: {storage_problem(exc, source) or redact(str(exc))}") from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("huggingface_hub", "httpx", "httpx2", "requests"):
            raise
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise SetupError(
            f"model: {shown} is not a local directory, and the hub does not answer for it as a model id "
            f"({type(exc).__name__}: {reason}); --model takes {MODEL_FORMS}"
        ) from exc
    if "config.json" not in identity.files:
        raise SetupError(
            f"model: {shown} holds no config.json, so it is not a checkpoint; --model takes {MODEL_FORMS}"
        )
    try:
        directory = preprocessing_directory(
            source, storage=config.storage, cache_dir=config.model.cache_dir, pinned=identity
        )
        load_preprocessing(directory, config.model.tokenizer)
    except (CheckpointError, TokenizerError) as exc:
        raise SetupError(f"model: {shown} cannot be scored faithfully: {exc}") from exc
    return identity


def list_input(config: JobConfig) -> list[tuple[str, int, str]]:
    """The input's listing, or a :class:`SetupError` that says why there is none."""
    from visualprm_ray.storage import list_files, redact, split_uri

    uri = config.input.uri
    try:
        listing = list_files(uri, config.storage, detail=True)
    except FileNotFoundError:
        near = _near(uri) if split_uri(uri)[0] == "file" else ""
        raise SetupError(
            f"input: nothing at {redact(uri)}{near}; --input takes a Parquet file, directory or glob"
        ) from None
    except Exception as exc:
        problem = storage_problem(exc, uri)
        if problem is None:
            raise
        raise SetupError(f"input: {problem}") from exc
    if not listing:
        raise SetupError(
            f"input: no .parquet files at {redact(uri)} (names starting with _ or . are skipped); "
            "--input takes a Parquet file, directory or glob"
        )
    # The first file's columns, against the layout (one footer): a wrong column name is refused
    # here; every file's footer is read and checked once Ray runs (inputs.plan_read).
    from visualprm_ray.job.inputs import choose_layout, read_footers

    choose_layout(config, read_footers(listing[:1], config)[0][1])
    return listing


def check_output(config: JobConfig) -> None:
    """The output can be written: a probe file written and removed (after the model and the input
    are known good, so that nothing is left behind when they are not)."""
    from visualprm_ray.storage import fsspec_filesystem, redact, split_uri

    uri = config.output.uri
    shown = redact(uri)
    if split_uri(uri)[0] == "file":
        path = Path(split_uri(uri)[1]).expanduser()
        if path.is_file():
            raise SetupError(
                f"output: {shown} is a file; --output takes a directory (the job writes many files)"
            )
        above = next((p for p in path.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise SetupError(f"output: {shown} is under {above}, which is a file, not a directory")
    fs, root = fsspec_filesystem(uri, config.storage)
    probe = f"{root.rstrip('/')}/{PROBE}"
    try:
        if split_uri(uri)[0] == "file":
            # Local only: on an object store there are no directories, and s3fs's makedirs would
            # create a missing bucket (a typo in the bucket's name must fail, not make one).
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as exc:
        problem = storage_problem(exc, uri)
        if problem is None and not isinstance(exc, OSError):
            raise
        raise SetupError(f"output: cannot write to {shown}: {problem or redact(str(exc))}") from exc


def preflight(config: JobConfig) -> tuple[ModelIdentity, list[Any]]:
    """Model, then input, then output: what :func:`visualprm_ray.job.driver.run_job` needs to start."""
    identity = check_model(config)
    listing = list_input(config)
    check_output(config)
    return identity, listing
