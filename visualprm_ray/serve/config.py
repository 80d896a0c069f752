"""The server's settings: the model and scoring sections of the job, plus the server's own.

Loaded like the job's config (YAML < the command's flags < ``--set section.key=value``), so one
YAML file can describe the model and the scoring for a batch job and for the endpoint alike: the
``model``, ``images``, ``scoring`` and ``storage`` sections are the job's own classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from visualprm_ray.job.config import ImagesConfig, ModelConfig, ScoringConfig, SectionedConfig
from visualprm_ray.storage import StorageOptions

TOKEN_ENV = "VISUALPRM_SERVE_TOKEN"


class ServerSection(BaseModel):
    """Where the endpoint listens, how many replicas serve it, and what it accepts."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP server binds; 127.0.0.1 (this machine only) unless told otherwise, e.g. 0.0.0.0 behind a firewall or in a pod.",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    replicas: int | None = Field(
        None,
        ge=1,
        description="Model replicas; null: one per GPU of the cluster, or one CPU replica where it has no GPU.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="'auto': a GPU per replica where the cluster has GPUs, else CPU replicas."
    )
    cpus_per_replica: float | None = Field(
        None,
        gt=0,
        description="CPUs Ray reserves for each replica (its image decoding and, on CPU, its torch threads); null: 1 for a GPU replica, the cluster's CPUs divided among CPU replicas.",
    )
    token_file: str | None = Field(
        None,
        description=f"File holding the bearer token clients must send; null: the ${TOKEN_ENV} environment variable. One of the two is required.",
    )
    max_body_bytes: int = Field(
        32 << 20, ge=1024, description="Largest request body accepted; a bigger one is answered 413."
    )
    max_candidates: int = Field(256, ge=1, description="Most responses in one request; more is a 400.")
    max_images: int = Field(16, ge=1, description="Most images in one request; more is a 400.")
    image_root: str | None = Field(
        None,
        description="Local directory under which image paths may be read (relative paths resolve against it); null: local paths are refused. Object-store URIs (s3://, gs://) are read with the storage settings.",
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="Requests one replica holds at once (they are coalesced into scorer batches); more wait in Ray Serve's queue.",
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests waiting for a replica beyond max_ongoing_requests; past it a request is answered 503 with Retry-After instead of waiting.",
    )
    retry_after_s: int = Field(1, ge=1, description="The Retry-After of a 503 for a full queue, in seconds.")
    batch_wait_s: float = Field(
        0.01,
        ge=0,
        description="How long a replica waits for more requests to fill a scorer batch once one is ready.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; null uses $RAY_ADDRESS if set, else starts a local Ray."
    )


class ServeConfig(SectionedConfig):
    """The scoring endpoint. Build it with :meth:`from_yaml` or :meth:`from_sources`."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(..., description="The VisualPRM checkpoint and how it is loaded.")
    images: ImagesConfig = Field(
        default_factory=ImagesConfig,
        description="The limits that guard decoding (images.root is not used: see server.image_root).",
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How conversations are built and batched for the reward model.",
    )
    server: ServerSection = Field(
        default_factory=ServerSection, description="The HTTP endpoint and its replicas."
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions, description="Object-store options for the model and image URIs."
    )


class ServeSetupError(RuntimeError):
    """The endpoint cannot start as configured (no token, a token file that cannot be read)."""


def load_token(config: ServeConfig) -> str:
    """The bearer token: ``server.token_file``'s content, else ``$VISUALPRM_SERVE_TOKEN``; never empty."""
    if config.server.token_file:
        try:
            token = Path(config.server.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ServeSetupError(f"cannot read server.token_file: {exc}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ServeSetupError(
            f"a bearer token is required: set ${TOKEN_ENV} or server.token_file (the endpoint never runs open)"
        )
    return token
