"""What the job fetches from S3 against what it uses: input column chunks, footers and images.

The input, the images and the output live on the loopback S3 server behind a request-counting
proxy (``s3_proxy.py``); the job reaches them through ``storage.endpoint_url``. Half the groups
carry their image in the file (``{"bytes": ...}``, as Hugging Face ``datasets`` writes it), half
as a path under ``images.root``. The input holds a large column the job does not read
(``notes``): a reader with read-ahead would fetch it anyway.
"""

from __future__ import annotations

import io
import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import run_job
from visualprm_ray.sample_data import make_groups

pytestmark = pytest.mark.slow

USED = ["id", "question", "image", "responses"]  # what the job reads of each input file


@pytest.fixture
def proxy(s3_server):
    from s3_proxy import S3Proxy

    proxy = S3Proxy(s3_server.endpoint_url, delay=0.05)
    yield proxy
    proxy.close()


def test_reads_fetch_what_they_use(ray_local, s3_env, tiny_model, proxy, tmp_path):
    bucket = s3_env
    fs = s3fs.S3FileSystem()
    groups = make_groups(48, candidates=3, seed=4)
    rng = random.Random(0)
    from PIL import Image

    def noise_png(seed: int) -> bytes:  # incompressible pixels: bytes the job must fetch and use
        buffer = io.BytesIO()
        Image.frombytes("RGB", (160, 160), random.Random(seed).randbytes(160 * 160 * 3)).save(buffer, "PNG")
        return buffer.getvalue()

    def image(i: int) -> dict:
        if i % 2:
            fs.pipe_file(f"{bucket}/img/{i:03d}.png", groups[i]["image"])
            return {"bytes": None, "path": f"{i:03d}.png"}
        return {"bytes": noise_png(i), "path": None}

    for part in range(2):
        chunk = groups[part * 24 : (part + 1) * 24]
        table = pa.table(
            {
                "id": [g["id"] for g in chunk],
                "question": [g["question"] for g in chunk],
                "image": [image(part * 24 + k) for k in range(len(chunk))],
                "responses": [g["responses"] for g in chunk],
                # Incompressible and ~10x the rest: fetched by read-ahead, never by the job.
                "notes": [rng.randbytes(40_000) for _ in chunk],
            }
        )
        pq.write_table(table, tmp_path / "part.parquet", row_group_size=6)
        fs.put(str(tmp_path / "part.parquet"), f"{bucket}/in/part-{part}.parquet")
    config = JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            f"storage.endpoint_url={proxy.endpoint_url}",
            f"images.root=s3://{bucket}/img/",
            "input.passthrough=none",
            "runtime.progress_interval_s=600",
        ],
        input_uri=f"s3://{bucket}/in/",
        output_uri=f"s3://{bucket}/out/",
        model_source=str(tiny_model),
    )
    proxy.reset()
    manifest = run_job(config, emit=lambda *_: None)
    assert manifest["counts"]["scored"] == 48 * 3
    requests = proxy.snapshot()

    inputs = [r for r in requests if r.path.startswith(f"/{bucket}/in/") and r.path.endswith(".parquet")]
    images = [r for r in requests if r.path.startswith(f"/{bucket}/img/")]
    assert not [r for r in inputs + images if r.method != "GET"], "HEAD or other requests before reads"

    # One GET per image, fetched together: a batch's GETs start while the others wait on the proxy.
    assert sorted(r.path for r in images) == [f"/{bucket}/img/{i:03d}.png" for i in range(1, 48, 2)]
    starts = sorted(r.started for r in images)
    assert min(b - a for a, b in itertools.pairwise(starts)) < proxy.delay / 2

    # Input bytes: each used column chunk and the footer, against what was fetched.
    used, total = 0, 0
    for part in range(2):
        with fs.open(f"{bucket}/in/part-{part}.parquet", "rb") as f:
            meta = pq.ParquetFile(f).metadata
        total += fs.size(f"{bucket}/in/part-{part}.parquet")
        used += meta.serialized_size + 8  # the footer, its length and the magic bytes
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in USED:
                    used += column.total_compressed_size
    assert total > 1.5 * used  # the unused column is a good part of each file
    fetched = sum(r.response_bytes for r in inputs)
    candidates = manifest["counts"]["candidates_in"]
    print(  # shown with -s: the figures docs/PERFORMANCE.md quotes
        f"input: {fetched / candidates:.0f} B fetched per candidate, {used / candidates:.0f} B used "
        f"({fetched / used:.3f}x), {len(inputs) / candidates:.3f} requests per candidate; "
        f"images: {len(images)} GETs for {len(images)} image objects; whole input files {total / candidates:.0f} B per candidate"
    )
    assert fetched <= 1.25 * used, (fetched, used)
    # Requests per input file: its footer once (the first file's twice: the check before Ray starts
    # reads its columns); per row group (4, far apart: the unused column lies between them) its id
    # chunk for the count and the id check, and its used chunks (adjacent: one range) for the read.
    for part in range(2):
        ranges = [r for r in inputs if r.path.endswith(f"part-{part}.parquet")]
        assert len(ranges) <= (2 if part == 0 else 1) + 2 * 4, [r.response_bytes for r in ranges]
