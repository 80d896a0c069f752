"""Row errors carry a kind from a closed set; a typo in a kind is our bug, not the data's."""

from __future__ import annotations

import pytest

from visualprm_ray.errors import ERROR_KINDS, ContextLengthError, ImageError, RowError


def test_kinds_default_by_class_and_can_be_set():
    assert RowError("x").kind == "invalid_response"
    assert ImageError("x").kind == "image_undecodable"
    assert ContextLengthError("x").kind == "context_length"
    assert ImageError("x", kind="image_missing").kind == "image_missing"
    assert isinstance(ImageError("x"), RowError)  # one except clause catches every data problem


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown error kind"):
        RowError("x", kind="image_broken")  # type: ignore[arg-type]


def test_kinds_are_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [k for k in ERROR_KINDS if f"`{k}`" not in readme]
    assert missing == []
