"""Fixtures of the model tests: the real InternLM2 tokenizer files, laid out as a checkpoint holds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_artifacts import TOKENIZER_FILES, real


@pytest.fixture
def real_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint directory as a user's VisualPRM-8B download holds its tokenizer (links, no copies)."""
    directory = tmp_path / "VisualPRM-8B"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        (directory / name).symlink_to(real(name))
    return directory


@pytest.fixture(scope="session")
def reference_facts() -> dict:
    return json.loads(real("reference_facts.json").read_text())


@pytest.fixture(scope="session")
def golden_ids() -> list[dict]:
    return [json.loads(line) for line in real("golden_ids.jsonl").read_text().splitlines() if line.strip()]
