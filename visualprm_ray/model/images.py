"""Turn whatever a row or a caller holds (bytes, a path or URI, a PIL image) into a PIL image.

The pixel limit is checked on the header, before any pixel is decoded, so a decompression bomb
costs a few bytes of reading rather than gigabytes of memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visualprm_ray.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

    from visualprm_ray.storage import StorageOptions

# 12 tiles of 448x448 need ~2.4 MP; 64 MP leaves room for scans and screenshots.
DEFAULT_MAX_PIXELS = 64_000_000


def open_image_bytes(
    data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "image"
) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name} is empty (0 bytes)", kind="image_empty")
    try:
        # PIL's own bomb check raises on > 2x its limit and only warns below; ours is explicit.
        with _pil_bomb_check_off():
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, max_pixels, name)  # on the header: before any pixel is decoded
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name} cannot be decoded: {exc}") from exc
    return image


class _pil_bomb_check_off:
    def __enter__(self) -> None:
        from PIL import Image

        self._saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self._saved


def resolve_uri(uri: str, root: str | None = None) -> str:
    """A relative path under ``root``; anything else (absolute paths, URIs) as it is."""
    if "://" not in uri and not Path(uri).is_absolute() and root:
        return root.rstrip("/") + "/" + uri
    return uri


def read_uri_bytes(
    uri: str,
    *,
    root: str | None = None,
    options: StorageOptions | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Bytes of a local path or any fsspec URI (``s3://``, ``gs://``...), relative paths under ``root``.

    One request: a GET of at most ``max_bytes + 1`` bytes (an oversized file costs the limit, not
    its size), with no HEAD before it.
    """
    from visualprm_ray.storage import read_range, with_retries

    resolved = resolve_uri(uri, root)
    end = None if max_bytes is None else max_bytes + 1
    try:
        return with_retries(
            lambda: read_range(resolved, options, end=end),
            what=f"reading image {resolved}",
            retries=options.retries if options else 5,
        )
    except (FileNotFoundError, IsADirectoryError) as exc:
        if resolved != uri:
            where = f" (resolved against images.root {root!r} as {resolved})"
        elif "://" not in uri and not os.path.isabs(os.path.expanduser(uri)):
            # Ray workers run in their own directories: a relative path needs images.root.
            where = (
                f" (a relative path, resolved against the worker's directory {os.getcwd()}; set images.root)"
            )
        else:
            where = ""
        raise ImageError(f"image not found: {uri}{where}", kind="image_missing") from exc


def image_uris(obj: Any) -> list[str]:
    """The paths/URIs an image cell refers to (for fetching them ahead, together)."""
    if isinstance(obj, (list, tuple)):
        return [u for item in obj for u in image_uris(item)]
    if isinstance(obj, dict) and obj.get("bytes") is None and obj.get("path"):
        return [str(obj["path"])]
    if isinstance(obj, (str, Path)):
        return [str(obj)]
    return []


def fetch_uris(
    uris: list[str],
    *,
    root: str | None = None,
    options: StorageOptions | None = None,
    max_bytes: int | None = None,
) -> dict[str, bytes | ImageError]:
    """Every distinct URI's bytes (or its error), fetched concurrently: one request each."""
    from visualprm_ray.storage import parallel_map

    distinct = list(dict.fromkeys(uris))

    def fetch(i: int) -> bytes | ImageError:
        try:
            return read_uri_bytes(distinct[i], root=root, options=options, max_bytes=max_bytes)
        except ImageError as exc:
            return exc

    return dict(zip(distinct, parallel_map(fetch, len(distinct), threads=16), strict=True))


def _check_pixels(image: Image.Image, max_pixels: int | None, name: str) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name} has {width}x{height} pixels, over the limit of {max_pixels}", kind="image_too_large"
        )


def _check_bytes(data: bytes | bytearray | memoryview, max_bytes: int | None, name: str) -> None:
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(
            f"{name} has {len(data)} bytes, over the limit of {max_bytes}", kind="image_too_large"
        )


def load_image(
    obj: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    root: str | None = None,
    options: StorageOptions | None = None,
    fetched: dict[str, bytes | ImageError] | None = None,
) -> Image.Image:
    """A PIL image from a PIL image, encoded bytes, a HF ``{bytes, path}`` dict, or a path/URI.

    ``fetched`` holds paths/URIs already read (:func:`fetch_uris`): those are not read again.
    """
    from PIL import Image

    if isinstance(obj, Image.Image):
        _check_pixels(obj, max_pixels, "image")
        return obj
    if isinstance(obj, dict):
        # b"" is an (empty) image payload, not an absent one: it must be reported as empty.
        if obj.get("bytes") is not None:
            name = obj.get("path") or "image"
            _check_bytes(obj["bytes"], max_bytes, name)
            return open_image_bytes(obj["bytes"], max_pixels=max_pixels, name=name)
        if not obj.get("path"):
            raise ImageError("image struct has neither bytes nor path", kind="image_missing")
        obj = obj["path"]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        _check_bytes(obj, max_bytes, "image")
        return open_image_bytes(bytes(obj), max_pixels=max_pixels)
    if isinstance(obj, (str, Path)):
        uri = str(obj)
        data = fetched.get(uri) if fetched is not None else None
        if isinstance(data, ImageError):
            raise data
        if data is None:
            data = read_uri_bytes(uri, root=root, options=options, max_bytes=max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            # Only max_bytes + 1 bytes were read: the true size is unknown, and need not be.
            raise ImageError(f"{uri} has more than {max_bytes} bytes, the limit", kind="image_too_large")
        return open_image_bytes(data, max_pixels=max_pixels, name=uri)
    raise ImageError(f"unsupported image value of type {type(obj).__name__}", kind="image_unsupported")
