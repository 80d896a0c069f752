"""The report's image lookup: a derived id (``<file>#<row>``) reads the one row group holding its row."""

from __future__ import annotations

import base64
import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from visualprm_ray.report.images import THUMB_PX, thumbnails


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_derived_ids_find_their_row_across_row_groups(tmp_path):
    (tmp_path / "in").mkdir()
    table = pa.table({"question": [f"q{i}" for i in range(5)], "image": [_png(10 * i) for i in range(5)]})
    pq.write_table(table, tmp_path / "in" / "part.parquet", row_group_size=2)  # rows 0-1, 2-3, 4
    manifest = {"config": {"input": {"uri": str(tmp_path / "in")}, "images": {}}}
    got = thumbnails(manifest, ["part.parquet#3", "part.parquet#4", "part.parquet#9", "other.parquet#0"])
    for gid, colour in (("part.parquet#3", 30), ("part.parquet#4", 40)):
        (src,), note = got[gid]
        assert note is None
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as thumb:
            assert thumb.size == (THUMB_PX, THUMB_PX // 2) and thumb.convert("RGB").getpixel((5, 5)) == (
                colour,
                0,
                0,
            )
    assert got["part.parquet#9"] == ([], "not found in the input")
    assert got["other.parquet#0"] == ([], "not found in the input")
