"""Step splitting and the exact conversation text VisualPRM scores (SPEC §2.1-2.2).

Every quirk here is deliberate: the released model was trained and evaluated on exactly this text,
so a "cleaner" rendering (stripping steps, a separator after empty turns, regex splitting) would
change the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

STEP_SEPARATOR = "\n\n"

# InternVL's default system message, used when the checkpoint's config sets none.
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

# Template `internvl2_5` (MPT style).
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}<|im_end|>\n"
USER_ROLE = "<|im_start|>user\n"
ASSISTANT_ROLE = "<|im_start|>assistant\n"
TURN_SEP = "<|im_end|>\n"

# At inference every assistant turn holds "+"; the score is read just before it.
STEP_PLACEHOLDER = "+"
QUESTION_HEADER = "### Question:\n"
SOLUTION_HEADER = "\n\n### Solution Process:\n"

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_TOKENS_PER_TILE = 256

# The text whose token ids mark a score position (SPEC §2.3).
SCORE_MARKER = ASSISTANT_ROLE + STEP_PLACEHOLDER + TURN_SEP


def split_steps(response: str, max_steps: int | None = 12) -> list[str]:
    """Split a response into steps the way VisualPRM does.

    Pieces of ``response.split("\\n\\n")`` (no stripping, empty pieces kept). With ``max_steps``
    set, consecutive chunks of ``ceil(n / max_steps)`` pieces are re-joined, so 13 pieces give 7
    steps, not 12 balanced ones.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    pieces = response.split(STEP_SEPARATOR)
    if max_steps is None or len(pieces) <= max_steps:
        return pieces
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    k = math.ceil(len(pieces) / max_steps)
    return [STEP_SEPARATOR.join(pieces[i : i + k]) for i in range(0, len(pieces), k)]


def _render_turn(role: str, message: str) -> str:
    # Upstream renders an empty message as the bare role prefix, without the separator.
    return role + message + TURN_SEP if message else role


def image_tokens(num_tiles: int, image_tokens_per_tile: int = IMAGE_TOKENS_PER_TILE) -> str:
    """The expansion of one ``<image>`` placeholder for an image cut into ``num_tiles`` tiles."""
    return IMG_START + IMG_CONTEXT * (image_tokens_per_tile * num_tiles) + IMG_END


def count_image_placeholders(question: str) -> int:
    return question.count(IMAGE_PLACEHOLDER)


def render_question(question: str, tiles_per_image: Sequence[int], image_tokens_per_tile: int) -> str:
    """The question with image placeholders added (when absent) and expanded.

    A question that already holds ``<image>`` placeholders must hold exactly one per image: a
    mismatch would silently drop or misplace image tokens, so it is an error.
    """
    num_images = len(tiles_per_image)
    found = count_image_placeholders(question)
    if num_images and found == 0:
        question = "<image>\n" * num_images + question
    elif found != num_images:
        raise ValueError(
            f"question has {found} '<image>' placeholder(s) but the row has {num_images} image(s)"
        )
    pieces = question.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for tiles, piece in zip(tiles_per_image, pieces[1:], strict=True):
        out.append(image_tokens(tiles, image_tokens_per_tile))
        out.append(piece)
    return "".join(out)


def build_conversation(
    question: str,
    steps: Sequence[str],
    tiles_per_image: Sequence[int] = (),
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
    image_tokens_per_tile: int = IMAGE_TOKENS_PER_TILE,
) -> str:
    """The exact text VisualPRM scores for one response (SPEC §2.2), image placeholders expanded.

    ``tiles_per_image`` holds each image's tile count (thumbnail included), empty for a text-only
    question. One user turn per step (the first prefixed by the question), each followed by an
    assistant turn holding ``+``.
    """
    head = conversation_head(
        render_question(question, tiles_per_image, image_tokens_per_tile), system_message
    )
    return head + conversation_tail(steps)


def conversation_head(rendered_question: str, system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """The text every candidate of a group shares: system turn and question, up to the first step."""
    return (
        SYSTEM_TEMPLATE.format(system_message=system_message)
        + USER_ROLE
        + QUESTION_HEADER
        + rendered_question
        + SOLUTION_HEADER
    )


def conversation_tail(steps: Sequence[str]) -> str:
    """The candidate's own text after :func:`conversation_head`: its steps and the assistant turns."""
    if not steps:
        raise ValueError("a response needs at least one step")
    # The first user turn is never empty (it holds the question), so it always ends with the separator.
    parts = [steps[0] + TURN_SEP, _render_turn(ASSISTANT_ROLE, STEP_PLACEHOLDER)]
    for step in steps[1:]:
        parts.append(_render_turn(USER_ROLE, step))
        parts.append(_render_turn(ASSISTANT_ROLE, STEP_PLACEHOLDER))
    return "".join(parts)
