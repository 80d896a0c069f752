"""Block sizing on a real local Ray: a read task's rows reach the actors as the blocks asked for.

Ray Data fuses what a read task yields into one block unless the read asks for more blocks
(``override_num_blocks``); this checks that ``input.num_blocks`` (through ``rows_per_block``)
really cuts a big row group into that many blocks, every row once.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.inputs import plan_read
from visualprm_ray.job.pipeline import rows_per_block
from visualprm_ray.job.stages.read import read_groups

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("num_blocks", [4, 10])
def test_num_blocks_cuts_one_big_row_group(ray_local, tmp_path, num_blocks):
    (tmp_path / "in").mkdir()
    n = 120
    table = pa.table(
        {
            "id": [f"g{i}" for i in range(n)],
            "question": ["q"] * n,
            "responses": [["a", "b"]] * n,
        }
    )
    pq.write_table(table, tmp_path / "in" / "one.parquet", row_group_size=n)  # one row group
    config = JobConfig.from_sources(
        None,
        [f"input.num_blocks={num_blocks}"],
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model_source=str(tmp_path),
    )
    plan = plan_read(config)
    per_block = rows_per_block(config, plan, plan.num_rows)
    assert per_block == n // num_blocks
    ds = read_groups(config, plan, rows_per_block=per_block).materialize()
    assert ds.num_blocks() == num_blocks
    sizes = [len(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]  # one per block
    assert len(sizes) == num_blocks and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    assert sorted(ds.to_pandas()["_vp_id"]) == sorted(f"g{i}" for i in range(n))
