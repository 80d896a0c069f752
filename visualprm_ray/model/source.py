"""Where a model comes from (a local directory, an object-store prefix, a hub id), and what it is.

A model's identity is its content, never its name: a checkpoint retrained into the same directory,
or uploaded again to the same prefix, is another model. :func:`model_identity` says what a source
holds right now:

- a local directory: the sha256 of every model file's bytes, computed once per file version and
  kept in the node's cache (keyed on path, size, mtime and inode), so a rerun does not hash
  16 GB again;
- an object-store prefix: the listing's sizes and ETags (the store's own content tags; any
  re-upload changes them), one listing call;
- a hub id: the repository's commit at the time, which the download then asks for.

A batch job computes the identity once on the driver and pins it: every actor resolves the source
with ``pinned=`` and fails with :class:`ModelIdentityError` rather than load anything else (a prefix
changed mid-run, a directory rewritten under a running job).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from visualprm_ray.storage import StorageOptions

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_CHUNK = 8 << 20


class ModelIdentityError(RuntimeError):
    """The model found is not the one the job is pinned to."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a model source holds: one entry per model file, and a digest over all of them."""

    kind: Literal["content", "object_store", "hub"]
    files: dict[str, dict[str, Any]] = field(repr=False)
    revision: str | None = None  # hub: the commit the files come from

    @property
    def digest(self) -> str:
        blob = json.dumps({"kind": self.kind, "files": self.files, "revision": self.revision}, sort_keys=True)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest, "revision": self.revision, "files": self.files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(kind=data["kind"], files=data["files"], revision=data.get("revision"))


def _identity_cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    from visualprm_ray.storage import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "identities"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_identity(
    directory: str | Path,
    cache_dir: str | os.PathLike[str] | None = None,
    patterns: tuple[str, ...] | None = None,
) -> ModelIdentity:
    """The sha256 of every model file of a local directory; unchanged files are not read again.

    The per-file digests are kept in the node's cache next to the file versions they belong to
    (size, mtime, inode): a file rewritten in place gets a new mtime (or size) and is hashed again.
    A lock per directory keeps the actors of one node from hashing the same files at once.
    ``patterns`` limits it to the files they keep (a preparer checks its tokenizer, not 16 GB of
    weights it never reads).
    """
    from visualprm_ray.storage import MODEL_FILE_PATTERNS, exclusive_lock, local_model_files

    directory = Path(directory).resolve()
    names = local_model_files(directory, patterns or MODEL_FILE_PATTERNS)
    if not names:
        raise ModelIdentityError(f"{directory} holds no model files")
    cache = _identity_cache(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(directory).encode()).hexdigest()[:24]
    record_path = cache / f"{key}.json"
    with exclusive_lock(cache / f"{key}.lock"):
        try:
            known = json.loads(record_path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
        files: dict[str, dict[str, Any]] = {}
        stamps: dict[str, list[int]] = {}
        for name in names:
            st = (directory / name).stat()
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            entry = known.get(name)
            digest = (
                entry["sha256"] if entry and entry.get("stamp") == stamp else _file_sha256(directory / name)
            )
            files[name] = {"size": st.st_size, "sha256": digest}
            stamps[name] = stamp
        # Files hashed before and not looked at now (another pattern) stay in the record.
        kept = {n: e for n, e in known.items() if n not in files}
        record = {
            "directory": str(directory),
            "files": {**kept, **{n: {**files[n], "stamp": stamps[n]} for n in names}},
        }
        tmp = record_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, record_path)
    return ModelIdentity("content", files)


def model_identity(
    source: str | Path, *, storage: StorageOptions | None = None, cache_dir: str | None = None
) -> ModelIdentity:
    """What ``source`` holds now (see the module docstring for each kind of source)."""
    path = Path(source)
    if path.is_dir():
        return content_identity(path, cache_dir)
    text = str(source)
    if "://" in text:
        from visualprm_ray.storage import remote_model_listing

        return ModelIdentity("object_store", remote_model_listing(text, storage))
    from huggingface_hub import HfApi

    info = HfApi().model_info(text)
    files = {s.rfilename: {"size": s.size} for s in info.siblings or []}
    return ModelIdentity("hub", files, revision=info.sha)


def resolve_model_source(
    source: str | Path,
    *,
    storage: StorageOptions | None = None,
    cache_dir: str | None = None,
    pinned: ModelIdentity | None = None,
    patterns: tuple[str, ...] | None = None,
) -> Path:
    """A local directory for a model source: a directory as is, an object-store prefix downloaded
    once per node into the cache, otherwise a hub id (where a hub is reachable).

    With ``pinned`` the directory is the pinned model or :class:`ModelIdentityError` is raised.
    ``patterns`` (e.g. :data:`visualprm_ray.storage.PREPROCESSING_PATTERNS`) narrows what is fetched
    and checked to the files that match.
    """
    from visualprm_ray.storage import MODEL_FILE_PATTERNS, _wanted

    patterns = patterns or MODEL_FILE_PATTERNS
    path = Path(source)
    if path.is_dir():
        if pinned is not None:
            found = content_identity(path, cache_dir, patterns)
            wanted = ModelIdentity(
                pinned.kind, {k: v for k, v in pinned.files.items() if _wanted(k, patterns)}
            )
            _check(str(source), wanted, found)
        return path
    text = str(source)
    if "://" in text:
        from visualprm_ray.storage import ModelChangedError, local_model_dir

        expected = pinned.files if pinned is not None and pinned.kind == "object_store" else None
        if pinned is not None and expected is None:
            raise ModelIdentityError(f"{text} is pinned to a {pinned.kind} identity, not an object-store one")
        try:
            return local_model_dir(text, storage, cache_dir, expected=expected, patterns=patterns)
        except ModelChangedError as exc:
            raise ModelIdentityError(f"refusing to load {exc}") from None
    from huggingface_hub import snapshot_download

    revision = None
    if pinned is not None:
        if pinned.kind != "hub":
            raise ModelIdentityError(f"{text} is pinned to a {pinned.kind} identity, not a hub one")
        revision = pinned.revision
    allow = HUB_PATTERNS if patterns == MODEL_FILE_PATTERNS else list(patterns)
    return Path(snapshot_download(text, revision=revision, allow_patterns=allow))


def preprocessing_directory(
    source: str | Path,
    *,
    storage: StorageOptions | None = None,
    cache_dir: str | None = None,
    pinned: ModelIdentity | None = None,
) -> Path:
    """A local directory with the model's config and tokenizer files alone: what tokenizing and
    tiling need. A CPU node never fetches (or hashes) the weights."""
    from visualprm_ray.storage import PREPROCESSING_PATTERNS

    return resolve_model_source(
        source, storage=storage, cache_dir=cache_dir, pinned=pinned, patterns=PREPROCESSING_PATTERNS
    )


def _check(source: str, pinned: ModelIdentity, found: ModelIdentity) -> None:
    if found.digest != pinned.digest:
        from visualprm_ray.storage import describe_listing_change, redact

        raise ModelIdentityError(
            f"refusing to load {redact(source)}: {describe_listing_change(pinned.files, found.files)} "
            f"(pinned {pinned.digest[:19]}, found {found.digest[:19]})"
        )
