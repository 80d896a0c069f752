"""The shown groups' images, read back from the run's input, as small inline thumbnails.

A report shows a handful of groups, so their rows are looked up directly: a derived id
(``<file>#<row>``) names its file and row; a user id is found with Parquet's statistics pruning
(``isin`` on the id column), so only the row groups that can hold it are read. Anything that
cannot be read (the input moved, a path that no longer resolves) gives a note instead of a
thumbnail; the report never fails for it.
"""

from __future__ import annotations

import base64
import io
from typing import Any

THUMB_PX = 160


def thumbnails(
    manifest: dict[str, Any], ids: list[str], options=None
) -> dict[str, tuple[list[str], str | None]]:
    """``id -> (data URIs of its images' thumbnails, a note when some could not be shown)``."""
    config = manifest.get("config") or {}
    inp, images = config.get("input") or {}, config.get("images") or {}
    out: dict[str, tuple[list[str], str | None]] = {}
    try:
        cells = _image_cells(inp, ids, options)
    except Exception as exc:  # the input is optional to a report: say why, show the rest
        return {i: ([], f"input images unavailable: {type(exc).__name__}: {exc}") for i in ids}
    for gid in ids:
        if gid not in cells:
            out[gid] = ([], "not found in the input")
            continue
        out[gid] = _thumbs(cells[gid], images.get("root"), options)
    return out


def _image_cells(inp: dict[str, Any], ids: list[str], options) -> dict[str, Any]:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from visualprm_ray.job.inputs import relative_names
    from visualprm_ray.storage import fsspec_filesystem, list_files, pyarrow_filesystem

    uri, id_col, image_col = inp["uri"], inp.get("id_column", "id"), inp.get("image_column", "image")
    files = list_files(uri, options)
    fs, _ = fsspec_filesystem(uri, options)
    pa_fs, _ = pyarrow_filesystem(uri, options)
    paths = [fs._strip_protocol(f) for f in files]
    dataset = ds.dataset(paths, filesystem=pa_fs, format="parquet")
    if image_col not in dataset.schema.names:
        return {i: None for i in ids}
    if id_col in dataset.schema.names:
        table = dataset.to_table(
            columns=[id_col, image_col], filter=ds.field(id_col).cast("string").isin(ids)
        )
        cells: dict[str, Any] = {}
        for gid, cell in zip(table[id_col].to_pylist(), table[image_col].to_pylist(), strict=True):
            cells.setdefault(str(gid), cell)  # the first row in input order, as the job takes it
        return cells
    by_name = dict(zip(relative_names(uri, files), paths, strict=True))
    cells = {}
    for gid in ids:
        name, _, row = gid.rpartition("#")
        if name not in by_name or not row.isdigit():
            continue
        with pa_fs.open_input_file(by_name[name]) as f:
            # Only the row group that holds the row: one column chunk, not the file's whole column.
            parquet = pq.ParquetFile(f)
            row = int(row)
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < rows:
                    cells[gid] = parquet.read_row_group(group, columns=[image_col])[image_col][row].as_py()
                    break
                row -= rows
    return cells


def _thumbs(cell: Any, root: str | None, options) -> tuple[list[str], str | None]:
    from PIL import Image

    from visualprm_ray.export.formats import image_structs
    from visualprm_ray.model.images import fetch_uris, image_uris

    try:
        structs = image_structs(cell, fetch_uris(image_uris(cell), root=root, options=options))
    except Exception as exc:
        return [], f"image unavailable: {exc}"
    out = []
    for s in structs:
        try:
            image = Image.open(io.BytesIO(s["bytes"]))
            image.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
        except Exception as exc:
            return out, f"an image cannot be decoded: {exc}"
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out, None
