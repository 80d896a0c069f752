"""Step splitting and conversation rendering, checked against literal strings for every quirk."""

from __future__ import annotations

import pytest

from visualprm_ray.model.prompt import (
    DEFAULT_SYSTEM_MESSAGE,
    build_conversation,
    image_tokens,
    render_question,
    split_steps,
)

SYS = "<|im_start|>system\nSYS<|im_end|>\n"


def _pieces(n: int) -> str:
    return "\n\n".join(f"p{i}" for i in range(n))


def test_split_plain_pieces_no_strip_and_empty_kept():
    assert split_steps(" a \n\n\n\nb\n\n") == [" a ", "", "b", ""]
    assert split_steps("one step only") == ["one step only"]
    assert split_steps("") == [""]
    # Only the literal two-newline separator splits; three newlines leave one behind.
    assert split_steps("a\n\n\nb") == ["a", "\nb"]
    assert split_steps("a\nb") == ["a\nb"]


def test_split_merges_in_chunks_of_ceil_n_over_max_steps():
    # 12 pieces: untouched.
    assert split_steps(_pieces(12)) == [f"p{i}" for i in range(12)]
    # 13 pieces: k = 2, so 7 steps (6 of two pieces, the last of one), not 12 balanced ones.
    steps = split_steps(_pieces(13))
    assert len(steps) == 7
    assert steps[0] == "p0\n\np1"
    assert steps[5] == "p10\n\np11"
    assert steps[6] == "p12"
    # 25 pieces: k = 3 -> 9 steps.
    assert len(split_steps(_pieces(25))) == 9
    # 20 pieces: k = 2 -> 10 steps.
    assert split_steps(_pieces(20))[-1] == "p18\n\np19"
    assert len(split_steps(_pieces(20))) == 10


def test_split_max_steps_none_and_custom():
    assert len(split_steps(_pieces(40), max_steps=None)) == 40
    assert split_steps(_pieces(5), max_steps=2) == ["p0\n\np1\n\np2", "p3\n\np4"]
    with pytest.raises(ValueError):
        split_steps(_pieces(5), max_steps=0)
    with pytest.raises(TypeError):
        split_steps(None)  # type: ignore[arg-type]


def test_conversation_text_only_literal():
    text = build_conversation("What is 1+1?", ["Add.", "It is 2."], [], system_message="SYS")
    assert text == (
        SYS + "<|im_start|>user\n### Question:\nWhat is 1+1?\n\n### Solution Process:\nAdd.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\nIt is 2.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
    )


def test_empty_step_renders_role_without_separator():
    text = build_conversation("Q", ["a", "", "c"], [], system_message="SYS")
    assert (
        text
        == (
            SYS + "<|im_start|>user\n### Question:\nQ\n\n### Solution Process:\na<|im_end|>\n"
            "<|im_start|>assistant\n+<|im_end|>\n"
            "<|im_start|>user\n"  # the empty step: bare role, no <|im_end|>
            "<|im_start|>assistant\n+<|im_end|>\n"
            "<|im_start|>user\nc<|im_end|>\n"
            "<|im_start|>assistant\n+<|im_end|>\n"
        )
    )


def test_empty_first_step_still_carries_question():
    text = build_conversation("Q", [""], [], system_message="SYS")
    assert text == (
        SYS + "<|im_start|>user\n### Question:\nQ\n\n### Solution Process:\n<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
    )


def test_image_prefix_added_when_absent():
    text = build_conversation("Q", ["s"], [2], system_message="SYS", image_tokens_per_tile=3)
    expected_img = "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    assert image_tokens(2, 3) == expected_img
    assert text == (
        SYS
        + "<|im_start|>user\n### Question:\n"
        + expected_img
        + "\nQ\n\n### Solution Process:\ns<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
    )


def test_existing_placeholder_is_expanded_in_place():
    q = render_question("Look: <image> what is x?", [1], image_tokens_per_tile=2)
    assert q == "Look: <img><IMG_CONTEXT><IMG_CONTEXT></img> what is x?"


def test_multi_image_one_prefix_per_image_in_order():
    q = render_question("Compare.", [1, 3], image_tokens_per_tile=1)
    assert q == "<img><IMG_CONTEXT></img>\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nCompare."
    q = render_question("A <image> B <image>", [2, 1], image_tokens_per_tile=1)
    assert q == "A <img><IMG_CONTEXT><IMG_CONTEXT></img> B <img><IMG_CONTEXT></img>"


def test_placeholder_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="placeholder"):
        render_question("<image> <image>", [1], image_tokens_per_tile=1)
    with pytest.raises(ValueError, match="placeholder"):
        render_question("<image> text only", [], image_tokens_per_tile=1)


def test_default_tokens_per_tile_and_system_message():
    text = build_conversation("Q", ["s"], [13])
    assert text.count("<IMG_CONTEXT>") == 13 * 256
    assert text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\n")


def test_pre_split_steps_are_used_verbatim():
    # Steps given as a list are not re-split, even when they hold the separator.
    text = build_conversation("Q", ["a\n\nb"], [], system_message="SYS")
    assert "### Solution Process:\na\n\nb<|im_end|>\n" in text
    assert text.count("<|im_start|>assistant\n+") == 1


def test_no_steps_is_an_error():
    with pytest.raises(ValueError):
        build_conversation("Q", [], [])
