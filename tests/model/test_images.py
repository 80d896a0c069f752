"""Images from whatever a row holds, with the limits that bound a row's memory checked first."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from visualprm_ray.errors import ImageError
from visualprm_ray.model.images import load_image, read_uri_bytes


def _png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "navy").save(buf, format="PNG")
    return buf.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with pixel data that cannot be decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def _kind(call) -> str:
    with pytest.raises(ImageError) as info:
        call()
    return info.value.kind


def test_every_representation_loads():
    data = _png()
    assert load_image(data).size == (40, 30)
    assert load_image({"bytes": data, "path": "x.png"}).size == (40, 30)
    assert load_image(Image.open(io.BytesIO(data))).size == (40, 30)


def test_the_pixel_limit_is_checked_on_the_header_before_decoding():
    bomb = _header_only_png(50_000, 50_000)
    assert _kind(lambda: load_image(bomb, max_pixels=64_000_000)) == "image_too_large"
    # Without the limit the decoder runs, and fails on the pixel data: proof that with the limit
    # the refusal came first.
    assert _kind(lambda: load_image(bomb, max_pixels=None)) == "image_undecodable"
    big = Image.new("L", (300, 300))
    assert _kind(lambda: load_image(big, max_pixels=80_000)) == "image_too_large"


def test_the_byte_limit_applies_to_every_representation(tmp_path):
    data = _png()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    limit = len(data) - 1
    assert _kind(lambda: load_image(data, max_bytes=limit)) == "image_too_large"
    assert _kind(lambda: load_image({"bytes": data, "path": None}, max_bytes=limit)) == "image_too_large"
    assert _kind(lambda: load_image(str(path), max_bytes=limit)) == "image_too_large"
    assert load_image(str(path), max_bytes=len(data)).size == (40, 30)


def test_an_oversized_file_is_read_only_up_to_the_limit(tmp_path):
    path = tmp_path / "huge.bin"
    path.write_bytes(b"\0" * 1_000_000)
    assert len(read_uri_bytes(str(path), max_bytes=1000)) == 1001
    assert len(read_uri_bytes(str(path))) == 1_000_000


def test_empty_missing_and_unsupported(tmp_path):
    assert _kind(lambda: load_image(b"")) == "image_empty"
    assert _kind(lambda: load_image({"bytes": b"", "path": "p.png"})) == "image_empty"
    assert _kind(lambda: load_image({"bytes": None, "path": None})) == "image_missing"
    assert _kind(lambda: load_image(str(tmp_path / "nope.png"))) == "image_missing"
    assert _kind(lambda: load_image(3.5)) == "image_unsupported"
    assert _kind(lambda: load_image(_png()[:60])) == "image_undecodable"


def test_relative_paths_resolve_under_the_root(tmp_path):
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "a.png").write_bytes(_png((8, 8)))
    assert load_image("figs/a.png", root=str(tmp_path)).size == (8, 8)
