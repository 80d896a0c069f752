"""The export's settings: which scores, which format and filters, where to write.

Loaded like the job's config (YAML < the command's flags < ``--set section.key=value``); what the
scoring job already decided (the input, its column names, ``images.root``, the step splitting,
``scoring.threshold``) comes from the scores' ``_manifest.json`` unless set here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from visualprm_ray.job.config import SectionedConfig
from visualprm_ray.storage import StorageOptions

Format = Literal["dpo", "sft", "prm"]


class ScoresSection(BaseModel):
    """The scoring job's output the export reads."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="The scoring job's output directory/prefix (local, s3://, gs://).")
    allow_incomplete: bool = Field(
        False,
        description="Read a scores output without _SUCCESS (a run still going or one that failed its checks).",
    )


class InputSection(BaseModel):
    """Where the images (and the question and response texts) are joined back from."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(
        None,
        description=(
            "The rollouts the scores were made from; null: the input recorded in the scores' _manifest.json "
            "(and then it must be unchanged since: same listing, sizes and versions)."
        ),
    )
    images_root: str | None = Field(
        None, description="Where relative image paths are resolved; null: the scoring job's images.root."
    )


class ExportSection(BaseModel):
    """The training-data format and the filters that decide which groups qualify."""

    model_config = ConfigDict(extra="forbid")

    format: Format = Field(
        ...,
        description=(
            "'dpo': one preference pair per group (best vs lowest score); 'sft': the best candidate of "
            "each group (rejection sampling); 'prm': every scored candidate with its steps and step labels."
        ),
    )
    min_margin: float = Field(
        0.0, description="dpo: a group qualifies when its best score minus its lowest is at least this."
    )
    min_score: float | None = Field(
        None,
        description="sft: a group qualifies when its best score is at least this; null keeps every best.",
    )
    threshold: float | None = Field(
        None,
        description="prm: a step's label is step_score > threshold; null: the scoring job's scoring.threshold.",
    )


class ExportOutput(BaseModel):
    """Where the dataset goes and how big its files are."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="The dataset's directory/prefix (local, s3://, gs://).")
    mode: Literal["error", "overwrite"] = Field(
        "error",
        description="An output that already holds files: 'error' refuses it, 'overwrite' replaces it.",
    )
    target_file_bytes: int = Field(
        256 << 20,
        gt=0,
        description=(
            "About this many bytes per Parquet file (images included), estimated from the input's column "
            "sizes; an image given by path counts as image_bytes_estimate."
        ),
    )
    image_bytes_estimate: int = Field(
        200_000,
        gt=0,
        description="Bytes assumed per image that the input holds as a path or URI (file sizing).",
    )
    rows_per_file: int | None = Field(
        None, ge=1, description="Rows per file instead of target_file_bytes (small exports and tests)."
    )


class ExportRuntime(BaseModel):
    """Ray: where the export runs."""

    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = Field(
        None, description="Ray cluster address; null uses $RAY_ADDRESS if set, else starts a local Ray."
    )
    num_partitions: int | None = Field(
        None,
        ge=1,
        description="Partitions of the shuffle that brings each group's scores and input rows together; null sizes it from the data.",
    )


class ExportConfig(SectionedConfig):
    """A whole export. Build it with :meth:`from_sources` (as the CLI does) or :meth:`from_dict`."""

    model_config = ConfigDict(extra="forbid")

    scores: ScoresSection = Field(..., description="The scoring job's output the export reads.")
    input: InputSection = Field(
        default_factory=InputSection, description="Where the images and texts are joined back from."
    )
    export: ExportSection = Field(..., description="The format and the filters.")
    output: ExportOutput = Field(..., description="Where the dataset goes.")
    runtime: ExportRuntime = Field(default_factory=ExportRuntime, description="Ray: where the export runs.")
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="Object-store options for the scores, the input and the output.",
    )
