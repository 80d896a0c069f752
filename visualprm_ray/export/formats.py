"""The rows as TRL's trainers take them, and the Hugging Face ``datasets`` features that describe them.

Which of TRL's forms, and why:

* ``dpo`` (preference) and ``sft`` (prompt-completion) are **conversational, with an ``images``
  column**: ``prompt`` is one user message whose content holds one ``{"type": "image"}`` block per
  image, then the question as a text block; ``chosen`` / ``rejected`` / ``completion`` are one
  assistant message with the response as a text block. That is the form TRL documents for
  vision-language models: its trainers fill each image block from ``images`` in order
  (``trl.data_utils.prepare_multimodal_messages``) and apply the processor's chat template, so
  the model's own image tokens go where its template puts them. The standard (plain string) form
  has nowhere to say where an image goes, and TRL's multimodal paths refuse it.
* ``prm`` (stepwise supervision) is **standard**: ``prompt`` is the question, ``completions``
  the steps, ``labels`` one boolean per step: TRL defines stepwise supervision in that form only.
  ``images`` rides along beside it.

The text is the question and the responses as the input gave them, never VisualPRM's scoring
template. Images keep their encoded bytes exactly as the input holds them (a path or URI is read
and embedded), as ``datasets``' ``Image`` feature stores them: ``{bytes, path}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa

from visualprm_ray.export.select import FIRST, REASON
from visualprm_ray.job import stages as col

IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
BLOCK = pa.struct([pa.field("type", pa.string()), pa.field("text", pa.string())])
MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.list_(BLOCK))]))

Format = Literal["dpo", "sft", "prm"]


def format_columns(fmt: Format) -> list[tuple[str, pa.DataType, str]]:
    """The format's own columns: name, type and what it holds (the dataset card lists these)."""
    images = (
        "images",
        pa.list_(IMAGE_STRUCT),
        "The group's images, in order (datasets Image: PIL when loaded).",
    )
    group = ("id", pa.string(), "The group id of the scores table.")
    if fmt == "dpo":
        return [
            group,
            images,
            ("prompt", MESSAGES, "One user message: an image block per image, then the question."),
            ("chosen", MESSAGES, "The best-scoring candidate (is_best) as one assistant message."),
            ("rejected", MESSAGES, "The lowest-scoring candidate as one assistant message."),
            ("chosen_score", pa.float32(), "VisualPRM score (mean step P(+)) of the chosen response."),
            ("rejected_score", pa.float32(), "VisualPRM score of the rejected response."),
            ("chosen_index", pa.int32(), "candidate_index of the chosen response."),
            ("rejected_index", pa.int32(), "candidate_index of the rejected response."),
        ]
    if fmt == "sft":
        return [
            group,
            images,
            ("prompt", MESSAGES, "One user message: an image block per image, then the question."),
            ("completion", MESSAGES, "The best-scoring candidate as one assistant message."),
            ("score", pa.float32(), "VisualPRM score of the completion."),
            ("candidate_index", pa.int32(), "candidate_index of the completion."),
        ]
    return [
        group,
        ("candidate_index", pa.int32(), "The candidate's index in its group."),
        images,
        ("prompt", pa.string(), "The question."),
        ("completions", pa.list_(pa.string()), "The response's steps, split as the scoring job split them."),
        ("labels", pa.list_(pa.bool_()), "Per step: step_score > threshold."),
        ("step_scores", pa.list_(pa.float32()), "Per step: VisualPRM's P(+)."),
        ("score", pa.float32(), "Mean of step_scores."),
    ]


def dataset_schema(fmt: Format, passthrough: list[pa.Field]) -> pa.Schema:
    """The Parquet schema of the dataset's files, with the ``datasets`` feature metadata."""
    fields = [pa.field(n, t) for n, t, _ in format_columns(fmt)] + list(passthrough)
    features = {f.name: _feature(f.type) for f in fields}
    features["images"] = [{"_type": "Image"}]
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=metadata)


_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}


def _feature(t: pa.DataType) -> Any:
    """A ``datasets`` feature in its JSON form. Lists are written as ``[feature]``, the form every
    ``datasets`` release reads (3.x and 4.x and later alike), rather than 4.x's ``List``."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_feature(t.value_type)]
    if pa.types.is_struct(t):
        return {f.name: _feature(f.type) for f in t}
    return {"dtype": _DTYPES.get(str(t), str(t)), "_type": "Value"}


def _user(question: str | None, images: int) -> list[dict[str, Any]]:
    blocks = [{"type": "image", "text": None}] * images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": blocks}]


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def image_structs(value: Any, fetched: dict[str, bytes | Exception]) -> list[dict[str, Any]]:
    """An input image cell -> the ``datasets`` Image structs, bytes embedded.

    Raises the fetch's error (an :class:`~visualprm_ray.errors.ImageError`) for an image that
    cannot be read now.
    """
    from visualprm_ray.job.stages.prepare import image_values

    out = []
    for ref in image_values(value):
        if isinstance(ref, dict):
            if ref.get("bytes") is not None:
                out.append({"bytes": ref["bytes"], "path": ref.get("path")})
                continue
            ref = ref.get("path")
        if isinstance(ref, (bytes, bytearray, memoryview)):
            out.append({"bytes": bytes(ref), "path": None})
            continue
        data = fetched.get(str(ref))
        if isinstance(data, Exception) or data is None:
            raise data or ValueError(f"image {ref!r} was not fetched")
        out.append({"bytes": data, "path": str(ref)})
    return out


def finish_rows(
    rows: list[dict[str, Any]], cells: list[Any], fmt: Format, fetched: dict[str, bytes | Exception]
) -> list[dict[str, Any]]:
    """Selected rows and their image cells -> the dataset's rows (a row whose image cannot be read
    becomes a reason row)."""
    from visualprm_ray.errors import ImageError

    out = []
    for row, cell in zip(rows, cells, strict=True):
        if row[REASON] is not None:
            out.append({"id": row["id"], REASON: row[REASON], FIRST: row[FIRST]})
            continue
        try:
            images = image_structs(cell, fetched)
        except ImageError:
            out.append({"id": row["id"], REASON: "image_unreadable", FIRST: row[FIRST]})
            continue
        question = row[col.QUESTION]
        done = {k: v for k, v in row.items() if k not in (col.QUESTION, col.IMAGE_FILE, col.IMAGE_ROW)}
        done["images"] = images
        if fmt == "dpo":
            done.update(
                prompt=_user(question, len(images)),
                chosen=_assistant(row["chosen"]),
                rejected=_assistant(row["rejected"]),
            )
        elif fmt == "sft":
            done.update(prompt=_user(question, len(images)), completion=_assistant(row["completion"]))
        else:
            done["prompt"] = question
        out.append(done)
    return out
