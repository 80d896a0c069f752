"""Where a model comes from: a local directory, an object-store prefix, or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visualprm_ray.storage import StorageOptions


def resolve_model_source(
    source: str | Path, *, storage: StorageOptions | None = None, cache_dir: str | None = None
) -> Path:
    """A local directory for a model source: a directory as is, an object-store prefix downloaded
    once per node into the cache, otherwise a hub id (where a hub is reachable)."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if "://" in text:
        from visualprm_ray.storage import local_model_dir

        return local_model_dir(text, storage, cache_dir)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    )
