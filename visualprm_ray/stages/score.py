"""Score (actor pool, one model replica per actor): prepared groups -> step scores.

Each actor loads the checkpoint once (from the node-local cache for object-store sources) and runs
the fast scorer of :mod:`visualprm_ray.scorer` over its batch of groups; the token budget, not the
batch's row count, decides how much goes through the model at once. The heavy prepared columns
(tokens, tiles) end here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from visualprm_ray import stages as col
from visualprm_ray.group import PreparedGroup

if TYPE_CHECKING:
    from visualprm_ray.config import JobConfig


def _int_arrays(column: pa.ChunkedArray) -> list[np.ndarray]:
    """list<int32> column -> one int64 numpy array per row, without a Python list per token."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _nested_int_arrays(column: pa.ChunkedArray) -> list[list[np.ndarray]]:
    array = column.combine_chunks()
    outer = array.offsets.to_numpy()
    inner = _int_arrays(pa.chunked_array([array.values]))
    return [inner[outer[i] : outer[i + 1]] for i in range(len(array))]


def groups_from_table(table: pa.Table) -> list[PreparedGroup | None]:
    """Rebuild the scorer's groups from prepared rows; None where the whole group failed."""
    prefixes = _int_arrays(table[col.PREFIX])
    suffixes = _nested_int_arrays(table[col.SUFFIXES])
    positions = _nested_int_arrays(table[col.POSITIONS])
    tiles = table[col.TILES].to_pylist()
    num_tiles = table[col.NUM_TILES].to_pylist()
    tile_size = table[col.TILE_SIZE].to_pylist()
    group_errors = table[col.GROUP_ERROR].to_pylist()
    cand_errors = table[col.CANDIDATE_ERROR].to_pylist()
    groups: list[PreparedGroup | None] = []
    for i in range(len(table)):
        if group_errors[i] is not None:
            groups.append(None)
            continue
        n, size = num_tiles[i], tile_size[i]
        pixels = (
            np.frombuffer(tiles[i], dtype=np.uint8).reshape(n, size, size, 3)
            if n
            else np.zeros((0, size, size, 3), np.uint8)
        )
        groups.append(
            PreparedGroup(
                prefix=prefixes[i],
                suffixes=suffixes[i],
                positions=positions[i],
                tiles=pixels,
                steps=[[] for _ in suffixes[i]],
                errors=[None if e is None else _Recorded(e) for e in cand_errors[i]],
            )
        )
    return groups


class _Recorded(Exception):
    """A candidate error recorded upstream; the scorer only needs to know the candidate is out."""


class ScoreStage:
    """Callable class for ``map_batches`` with an actor pool: adds per-candidate step scores."""

    def __init__(self, config: JobConfig, model_dir: str, device: str, progress: str | None = None) -> None:
        from visualprm_ray.checkpoint import load_checkpoint
        from visualprm_ray.scorer import GroupScorer, resolve_model_source

        if device == "cpu":
            import os

            import torch

            # Ray pins OMP_NUM_THREADS to the actor's CPU reservation (often 1); on a CPU-only node
            # the scorer is the heavy stage and should use the cores its pool was sized for.
            torch.set_num_threads(max(1, config.runtime.cpu_threads_per_scorer or os.cpu_count() or 1))

        checkpoint = load_checkpoint(
            resolve_model_source(model_dir, storage=config.storage, cache_dir=config.model.cache_dir),
            dtype=config.model.dtype,
            device=device,
            attn_implementation=config.model.attn_implementation,
            tokenizer_kind=config.model.tokenizer,
        )
        self.scorer = GroupScorer(
            checkpoint,
            token_budget=config.scoring.token_budget,
            vision_batch=config.scoring.vision_batch,
            mode=config.scoring.prefix_mode,
        )
        from visualprm_ray.progress import ProgressReporter

        self.progress = ProgressReporter.connect(progress) if progress else None

    def __call__(self, table: pa.Table) -> pa.Table:
        start = time.perf_counter()
        groups = groups_from_table(table)
        live = [g for g in groups if g is not None]
        scored = iter(self.scorer.score(live)) if live else iter(())
        step_scores = []
        done = errors = tokens = 0
        num_tokens = table[col.NUM_TOKENS].to_pylist()
        for i, group in enumerate(groups):
            n = len(num_tokens[i])
            if group is None:
                step_scores.append([None] * n)
                errors += max(n, 1)
                continue
            values = next(scored)
            step_scores.append([None if v is None else v.tolist() for v in values])
            done += sum(v is not None for v in values)
            errors += sum(v is None for v in values)
            tokens += sum(t for t, v in zip(num_tokens[i], values, strict=True) if v is not None)
        if self.progress is not None:
            self.progress.add(
                scored=done,
                errored=errors,
                tokens=tokens,
                groups_scored=len(table),
                score_s=time.perf_counter() - start,
            )
        out = table.drop_columns(list(col.PREPARED_ONLY))
        return out.append_column(col.STEP_SCORES, pa.array(step_scores, pa.list_(pa.list_(pa.float32()))))
