"""Typed row errors: what is wrong with a row's *data*, as opposed to a bug in our code.

A row error ends up in the output row (``error`` = the message, ``error_kind`` = one of
:data:`ERROR_KINDS`, ``error_stage`` = the stage that refused it) and the job goes on. Any other
exception is a bug and fails the job loudly. The kinds are a closed, documented set so that
notebooks and dashboards can group on them; the message says what exactly was wrong.
"""

from __future__ import annotations

from typing import Literal, get_args

ErrorKind = Literal[
    "invalid_question",  # null, not a string, or empty
    "no_candidates",  # the group's response list is null or empty
    "invalid_response",  # a null or non-string response, empty or non-string pre-split steps
    "steps_unplaceable",  # a step forges the scoring marker, so its score position cannot be found
    "image_tokens_in_text",  # the text itself holds image-context tokens
    "image_placeholder_mismatch",  # `<image>` placeholders do not match the number of images
    "image_missing",  # a path/object that does not exist, a null list entry, a struct with no data
    "image_empty",  # zero bytes
    "image_undecodable",  # truncated or corrupt, or not an image at all
    "image_too_large",  # over images.max_pixels (checked on the header) or images.max_bytes
    "image_unsupported",  # a value of a type the image column cannot hold
    "context_length",  # the conversation is longer than the model's context (context_policy: error)
    "invalid_candidate_index",  # flat layout: the candidate index column is null or repeats in the group
    "preparer_crash",  # the preparation actor died every time it held this group (poison row)
    "scorer_crash",  # the scoring actor died every time it held this group (poison row)
    "out_of_memory",  # the device ran out of memory even for this group alone
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


class RowError(ValueError):
    """A candidate or group that cannot be scored for a reason that lies in the input data."""

    kind: ErrorKind = "invalid_response"

    def __init__(self, message: str, *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            if kind not in ERROR_KINDS:
                raise ValueError(f"unknown error kind {kind!r}")  # a typo in our code, not bad data
            self.kind = kind


class ImageError(RowError):
    """An image cannot be used: undecodable, missing, empty or over a limit."""

    kind: ErrorKind = "image_undecodable"


class ContextLengthError(RowError):
    kind: ErrorKind = "context_length"
