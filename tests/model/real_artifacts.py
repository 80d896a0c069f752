"""The real InternLM2 tokenizer files and InternVL2.5-8B weight index in ``../shared/real-internlm2``.

Read from there, never copied into the project (PROVENANCE.md there says where each comes from).
CI has ``../shared``: a missing directory fails the tests that need it rather than skipping them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[3] / "shared" / "real-internlm2"
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]


def real(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the real-artifact tests need ../shared/real-internlm2 (see its PROVENANCE.md)"
        )
    return path
