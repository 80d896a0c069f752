"""Small file helpers over the project's storage layer, so evaluation inputs and reports may live on
local disk or in object storage alike (same endpoints, credentials and retries as the job)."""

from __future__ import annotations

from visualprm_ray.storage import fsspec_filesystem, redact, with_retries


def join_uri(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_filesystem(uri)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return with_retries(read, what=f"read {redact(uri)}")


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = fsspec_filesystem(uri)

    def write() -> None:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)

    with_retries(write, what=f"write {redact(uri)}")


def exists(uri: str) -> bool:
    fs, path = fsspec_filesystem(uri)
    # s3fs caches listings per shared instance: a marker written since would look absent.
    fs.invalidate_cache()
    return with_retries(lambda: fs.exists(path), what=f"look up {redact(uri)}")
