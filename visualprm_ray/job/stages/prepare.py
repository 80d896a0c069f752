"""Prepare (CPU actors): decode and tile images, split steps, render and tokenize, split the prefix.

An actor loads the tokenizer and the checkpoint facts once (no weights, no torch) and turns each
group row into token arrays plus uint8 tiles for the scorer. Problems in the data become typed
errors in the row (``error_stage = "prepare"``) and the job goes on; anything else is a bug and
fails loudly.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from visualprm_ray.errors import ImageError, RowError
from visualprm_ray.job import stages as col
from visualprm_ray.model.group import candidate_steps, prepare_group
from visualprm_ray.model.images import load_image

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig

STAGE = "prepare"
_INT_LIST = pa.list_(pa.int32())
_STR_LIST = pa.list_(pa.string())

PREPARED_COLUMNS = {
    col.CANDIDATE_INDEX: _INT_LIST,
    col.RESPONSE_TEXT: _STR_LIST,
    col.PREFIX: _INT_LIST,
    col.SUFFIXES: pa.list_(_INT_LIST),
    col.POSITIONS: pa.list_(_INT_LIST),
    col.TILES: pa.large_binary(),
    col.NUM_TILES: pa.int32(),
    col.TILE_SIZE: pa.int32(),
    col.NUM_TOKENS: _INT_LIST,
    col.NUM_STEPS: _INT_LIST,
    col.CANDIDATE_ERROR: _STR_LIST,
    col.CANDIDATE_ERROR_STAGE: _STR_LIST,
    col.CANDIDATE_ERROR_KIND: _STR_LIST,
    col.TRUNCATED: pa.list_(pa.bool_()),
    col.GROUP_ERROR: pa.string(),
    col.GROUP_ERROR_STAGE: pa.string(),
    col.GROUP_ERROR_KIND: pa.string(),
}


def image_values(value: Any) -> list[Any]:
    """A row's image cell as a list of image references (null -> no image)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if any(v is None for v in value):
            raise ImageError("the image list holds a null entry", kind="image_missing")
        return list(value)
    return [value]


class PrepareStage:
    """Callable class for ``map_batches``: one prepared row per group row.

    A group that kills the actor every time it is prepared (a native crash in an image decoder)
    is isolated by the crash journal and recorded as ``preparer_crash`` (:mod:`~visualprm_ray.job.journal`).
    """

    def __init__(
        self,
        config: JobConfig,
        model_dir: str,
        model_identity: dict | None = None,
        progress: str | None = None,
        journal: str | None = None,
    ) -> None:
        from visualprm_ray.job import faults
        from visualprm_ray.job.journal import JournalClient
        from visualprm_ray.job.progress import ProgressReporter
        from visualprm_ray.job.startup import start

        self.progress = ProgressReporter.connect(progress) if progress else None
        if self.progress is not None:
            self.progress.joined()  # before anything can fail: the job's end ends this actor
        self.config = config
        self.faults = faults.active_plan()
        self._fetched: dict = {}  # the current batch's images read by path/URI
        start(STAGE, lambda: self._load(model_dir, model_identity))
        self.system_message = config.model.system_message or self.info.system_message
        self.max_context = config.scoring.max_context or self.info.max_context
        self.max_tiles = config.images.max_tiles or self.info.max_tiles
        self.journal = JournalClient(journal, STAGE) if journal else None

    def _load(self, model_dir: str, model_identity: dict | None) -> None:
        from visualprm_ray.model.checkpoint import load_preprocessing
        from visualprm_ray.model.source import ModelIdentity, preprocessing_directory

        if self.faults is not None:
            self.faults.before_start(STAGE)
        config = self.config
        pinned = ModelIdentity.from_dict(model_identity) if model_identity else None
        directory = preprocessing_directory(
            model_dir, storage=config.storage, cache_dir=config.model.cache_dir, pinned=pinned
        )
        self.tokenizer, self.info = load_preprocessing(directory, config.model.tokenizer)

    def _tiles(self, value: Any) -> list[np.ndarray]:
        from visualprm_ray.model.tiling import tile_image

        images = self.config.images
        return [
            tile_image(
                load_image(
                    ref,
                    max_pixels=images.max_pixels,
                    max_bytes=images.max_bytes,
                    root=images.root,
                    options=self.config.storage,
                    fetched=self._fetched,
                ),
                max_tiles=self.max_tiles,
                tile_size=self.info.image_size,
                use_thumbnail=self.info.use_thumbnail,
                min_tiles=self.info.min_tiles,
            )
            for ref in image_values(value)
        ]

    def _steps(self, response: Any, steps: Any) -> list[str] | RowError:
        try:
            if steps is not None:
                return candidate_steps(steps, None)  # pre-split steps are scored as given
            if response is None:
                raise RowError("the response is null", kind="invalid_response")
            if not isinstance(response, str):
                raise RowError(
                    f"the response must be a string, got {type(response).__name__}", kind="invalid_response"
                )
            return candidate_steps(response, self.config.scoring.max_steps)
        except RowError as exc:
            return exc

    def _unprepared(self, row: dict[str, Any]) -> dict[str, Any]:
        """A prepared row with nothing prepared yet: every candidate without tokens or errors."""
        responses = row[col.RESPONSES]
        responses = [] if responses is None else list(responses)
        n = len(responses)
        indices = row.get(col.CANDIDATE_INDEX) or list(range(n))
        return {
            col.CANDIDATE_INDEX: indices,
            col.RESPONSE_TEXT: [r if isinstance(r, str) else None for r in responses],
            col.PREFIX: [],
            col.SUFFIXES: [[] for _ in range(n)],
            col.POSITIONS: [[] for _ in range(n)],
            col.TILES: b"",
            col.NUM_TILES: 0,
            col.TILE_SIZE: self.info.image_size,
            col.NUM_TOKENS: [None] * n,
            col.NUM_STEPS: [None] * n,
            col.CANDIDATE_ERROR: [None] * n,
            col.CANDIDATE_ERROR_STAGE: [None] * n,
            col.CANDIDATE_ERROR_KIND: [None] * n,
            col.TRUNCATED: [None] * n,
            col.GROUP_ERROR: None,
            col.GROUP_ERROR_STAGE: None,
            col.GROUP_ERROR_KIND: None,
        }

    def prepare_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = self._unprepared(row)
        responses = [] if row[col.RESPONSES] is None else list(row[col.RESPONSES])
        n = len(responses)
        steps_col = row.get(col.STEPS)
        try:
            if row.get(col.INDEX_ERROR) is not None:
                out[col.GROUP_ERROR_STAGE] = "read"  # found while regrouping the flat rows
                raise RowError(
                    f"{row[col.INDEX_ERROR]}; candidates are numbered in input order instead",
                    kind="invalid_candidate_index",
                )
            if n == 0:
                raise RowError(
                    "the group has no candidate responses (null or empty list)", kind="no_candidates"
                )
            tiles = self._tiles(row[col.IMAGE])
            steps = [
                self._steps(r, steps_col[k] if steps_col is not None and k < len(steps_col) else None)
                for k, r in enumerate(responses)
            ]
            group = prepare_group(
                row[col.QUESTION],
                steps,
                tiles,
                self.tokenizer,
                system_message=self.system_message,
                image_tokens_per_tile=self.info.image_tokens_per_tile,
                image_token_id=self.info.image_token_id,
                max_context=self.max_context,
                context_policy=self.config.scoring.context_policy,
            )
        except RowError as exc:  # ImageError included; anything else is a bug and propagates
            if self.config.runtime.on_error == "raise":
                raise
            out[col.GROUP_ERROR] = str(exc)
            out[col.GROUP_ERROR_STAGE] = out[col.GROUP_ERROR_STAGE] or STAGE
            out[col.GROUP_ERROR_KIND] = exc.kind
            return out
        if self.config.runtime.on_error == "raise":
            for err in group.errors:
                if err is not None:
                    raise err
        out[col.PREFIX] = group.prefix.astype(np.int32)
        out[col.SUFFIXES] = [s.astype(np.int32) for s in group.suffixes]
        out[col.POSITIONS] = [p.astype(np.int32) for p in group.positions]
        out[col.TILES] = group.tiles.tobytes()
        out[col.NUM_TILES] = len(group.tiles)
        for k in range(n):
            error = group.errors[k]
            if error is None:
                out[col.NUM_TOKENS][k] = group.sequence_length(k)
                out[col.NUM_STEPS][k] = len(group.steps[k])
                out[col.TRUNCATED][k] = group.truncated[k]
            else:
                out[col.CANDIDATE_ERROR][k] = str(error)
                out[col.CANDIDATE_ERROR_STAGE][k] = STAGE
                out[col.CANDIDATE_ERROR_KIND][k] = error.kind
        return out

    def _prepare_rows(self, ids, rows):
        from visualprm_ray.model.images import fetch_uris, image_uris

        if self.faults is not None:
            self.faults.before_prepare(list(ids))
        images = self.config.images
        # Every image the batch refers to by path or URI, fetched at once (one GET each) rather
        # than one after the other as the rows are prepared.
        uris = [u for row in rows for u in image_uris(row.get(col.IMAGE))]
        self._fetched = fetch_uris(
            uris, root=images.root, options=self.config.storage, max_bytes=images.max_bytes
        )
        try:
            return [self.prepare_row(row) for row in rows]
        finally:
            self._fetched = {}

    def _crashed(self, row: dict[str, Any], crashes: int) -> dict[str, Any]:
        """The row of a group that killed the preparation actor every time it was prepared alone."""
        out = self._unprepared(row)
        out[col.GROUP_ERROR] = (
            f"the preparation actor died {crashes} time(s) while preparing this group alone; "
            "it was not tried again"
        )
        out[col.GROUP_ERROR_STAGE] = STAGE
        out[col.GROUP_ERROR_KIND] = "preparer_crash"
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        start = time.perf_counter()
        out = self._prepare_table(table)
        if self.progress is not None:
            self.progress.add(prepare_s=time.perf_counter() - start, groups_prepared=len(table))
        return out

    def _prepare_table(self, table: pa.Table) -> pa.Table:
        from visualprm_ray.job.journal import run_isolated

        consumed = [
            c
            for c in (col.QUESTION, col.IMAGE, col.RESPONSES, col.STEPS, col.CANDIDATE_INDEX, col.INDEX_ERROR)
            if c in table.column_names
        ]
        rows = table.select(consumed).to_pylist()
        prepared = run_isolated(
            self.journal,
            table[col.ID].to_pylist(),
            rows,
            batch=self._prepare_rows,
            crashed=self._crashed,
            max_crashes=self.config.runtime.max_crashes_per_group,
        )
        keep = table.drop_columns(consumed)
        for name, dtype in PREPARED_COLUMNS.items():
            keep = keep.append_column(name, pa.array([p[name] for p in prepared], dtype))
        return keep
