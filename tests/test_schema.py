"""The output schema: defined once, and the README shows exactly what the code defines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from visualprm_ray.schema import OUTPUT_SCHEMA, output_schema, render_schema_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_rendered_schema():
    text = README.read_text()
    block = text.split("<!-- schema:start -->\n", 1)[1].split("\n<!-- schema:end -->", 1)[0]
    assert block.strip() == render_schema_table()


def test_schema_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "visualprm_ray", "schema"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == render_schema_table()


def test_passthrough_goes_between_keys_and_results():
    schema = output_schema([pa.field("policy", pa.string())])
    assert schema.names[:3] == ["id", "candidate_index", "policy"]
    assert schema.names[3:] == OUTPUT_SCHEMA.names[2:]
    with pytest.raises(ValueError, match="collide"):
        output_schema([pa.field("score", pa.float64())])


def test_every_column_is_typed_and_nullable():
    assert all(f.nullable for f in OUTPUT_SCHEMA)
    assert OUTPUT_SCHEMA.field("step_scores").type == pa.list_(pa.float32())
    assert OUTPUT_SCHEMA.field("candidate_index").type == pa.int32()
