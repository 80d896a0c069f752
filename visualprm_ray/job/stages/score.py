"""Score (actor pool, one model replica per actor): prepared groups -> step scores.

Each actor loads the checkpoint once (from the node-local cache for object-store sources) and runs
the fast scorer of :mod:`visualprm_ray.model.scoring` over its batch of groups; the token budget, not the
batch's row count, decides how much goes through the model at once. The heavy prepared columns
(tokens, tiles) end here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from visualprm_ray.errors import RowError
from visualprm_ray.job import stages as col
from visualprm_ray.model.group import PreparedGroup

STAGE = "score"

if TYPE_CHECKING:
    from visualprm_ray.errors import ErrorKind
    from visualprm_ray.job.config import JobConfig


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


# Budgets below this stop helping: a chunk already holds a single candidate.
_MIN_TOKEN_BUDGET = 256


@dataclass(frozen=True)
class Failure:
    """A candidate the device could not score; it becomes an error row of the score stage."""

    kind: ErrorKind
    message: str


# Per group, per candidate: step scores, None (refused before scoring) or a Failure.
GroupResult = list[np.ndarray | Failure | None]


class ScoreStage:
    """Callable class for ``map_batches`` with an actor pool: adds per-candidate step scores.

    Faults are handled here so that one bad group never costs the job: a device out of memory
    splits the batch, then shrinks the token budget, before recording ``out_of_memory`` for a
    group that does not fit alone; a batch whose earlier attempt killed the actor is scored one
    group at a time, and a group that keeps killing it is recorded as ``scorer_crash``
    (see :mod:`visualprm_ray.job.journal`).
    """

    def __init__(
        self,
        config: JobConfig,
        model_dir: str,
        device: str,
        model_identity: dict | None = None,
        cpu_threads: int | None = None,
        progress: str | None = None,
        journal: str | None = None,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from visualprm_ray.job import faults
        from visualprm_ray.job.progress import ProgressReporter
        from visualprm_ray.job.startup import start

        self.progress = ProgressReporter.connect(progress) if progress else None
        if self.progress is not None:
            self.progress.joined()  # before anything can fail: the job's end ends this actor
        # Every torch call of this actor (the model load here, each batch in __call__) runs on
        # this one thread. Ray Data calls __call__ from its own worker thread, not the thread
        # that ran __init__; once torch has run on two threads (likely cause: OpenMP keeps a
        # worker team per calling thread), scoring on a 2-core node ran 20-45% slower with
        # 1.35-1.6 of 2 cores busy (benchmarks/scorer_thread_cpu.py).
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visualprm-torch")
        self.faults = faults.active_plan()
        load = self._torch_thread.submit
        start(
            STAGE, lambda: load(self._load, config, model_dir, device, model_identity, cpu_threads).result()
        )
        self.max_crashes = config.runtime.max_crashes_per_group
        from visualprm_ray.job.journal import JournalClient

        self.journal = JournalClient(journal, STAGE) if journal else None
        if self.progress is not None:
            self.progress.started(STAGE)

    def _load(
        self,
        config: JobConfig,
        model_dir: str,
        device: str,
        model_identity: dict | None,
        cpu_threads: int | None,
    ) -> None:
        from visualprm_ray.model.checkpoint import load_checkpoint
        from visualprm_ray.model.scoring import make_scorer
        from visualprm_ray.model.source import ModelIdentity, resolve_model_source

        if self.faults is not None:
            self.faults.before_start(STAGE)

        if device == "cpu":
            import torch

            from visualprm_ray.job.layout import usable_cores

            # Ray pins OMP_NUM_THREADS to the actor's CPU reservation (often 1); the driver sized
            # each replica's share of the node's cores (visualprm_ray.job.layout), and a stage built
            # without that share takes the configured count or every core.
            threads = cpu_threads or config.runtime.cpu_threads_per_scorer or usable_cores()
            torch.set_num_threads(max(1, threads))

        pinned = ModelIdentity.from_dict(model_identity) if model_identity else None
        directory = resolve_model_source(
            model_dir, storage=config.storage, cache_dir=config.model.cache_dir, pinned=pinned
        )
        checkpoint = load_checkpoint(
            directory,
            dtype=config.model.dtype,
            device=device,
            attn_implementation=config.model.attn_implementation,
            tokenizer_kind=config.model.tokenizer,
        )
        self.scorer = make_scorer(
            checkpoint,
            token_budget=config.scoring.token_budget,
            vision_batch=config.scoring.vision_batch,
            mode=config.scoring.prefix_mode,
            options=config.scoring.kernels.options(),
        )
        if self.faults is not None:
            from visualprm_ray.job import faults

            faults.install(self.faults, self.scorer)

    # -- scoring with fault handling ------------------------------------------------------------

    def _score(self, ids: list[str], groups: list[PreparedGroup]) -> list[GroupResult]:
        """Scores per group; out of device memory, the work is split until it fits.

        Halves of the batch first, then, for one group, smaller token budgets (fewer candidates
        per forward), then one candidate at a time: only a candidate that does not fit even alone
        is recorded as ``out_of_memory``, and its neighbours are still scored.
        """
        import torch

        if self.faults is not None:
            self.faults.before_score(ids)
        try:
            return self.scorer.score(groups)
        except torch.OutOfMemoryError:
            self._release_memory()
        if len(groups) > 1:
            half = len(groups) // 2
            return self._score(ids[:half], groups[:half]) + self._score(ids[half:], groups[half:])
        budget = self.scorer.token_budget
        try:
            while self.scorer.token_budget // 2 >= _MIN_TOKEN_BUDGET:
                self.scorer.token_budget //= 2
                try:
                    return self.scorer.score(groups)
                except torch.OutOfMemoryError:
                    self._release_memory()
            return [self._score_candidates_alone(groups[0])]
        finally:
            self.scorer.token_budget = budget

    def _score_candidates_alone(self, group: PreparedGroup) -> GroupResult:
        import torch

        out: GroupResult = []
        for k in range(group.num_candidates):
            if not group.scorable(k):
                out.append(None)
                continue
            # The same group with every other candidate set aside: same prefix, one suffix.
            aside = RowError("scored on its own")
            alone = replace(group, errors=[e if j == k else (e or aside) for j, e in enumerate(group.errors)])
            try:
                out.append(self.scorer.score([alone])[0][k])
            except torch.OutOfMemoryError:
                self._release_memory()
                out.append(
                    Failure(
                        "out_of_memory",
                        f"the device ran out of memory scoring this candidate alone "
                        f"({group.sequence_length(k)} tokens, token budget {self.scorer.token_budget})",
                    )
                )
        return out

    def _release_memory(self) -> None:
        import gc

        import torch

        gc.collect()  # the failed forward's tensors are only garbage once its frames are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _score_live(self, ids: list[str], groups: list[PreparedGroup]) -> list[GroupResult]:
        from visualprm_ray.job.journal import run_isolated

        def crashed(group: PreparedGroup, crashes: int) -> GroupResult:
            crash = Failure(
                "scorer_crash",
                f"the scoring actor died {crashes} time(s) while scoring this group alone; it was not tried again",
            )
            return [crash if group.scorable(k) else None for k in range(group.num_candidates)]

        return run_isolated(
            self.journal, ids, groups, batch=self._score, crashed=crashed, max_crashes=self.max_crashes
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        return self._torch_thread.submit(self._score_table, table).result()

    def _score_table(self, table: pa.Table) -> pa.Table:
        start = time.perf_counter()
        groups = groups_from_table(table)
        all_ids = table[col.ID].to_pylist()
        live = [i for i, g in enumerate(groups) if g is not None]
        scored = self._score_live([all_ids[i] for i in live], [groups[i] for i in live]) if live else []
        outcome = dict(zip(live, scored, strict=True))
        step_scores = []
        errors_col = table[col.CANDIDATE_ERROR].to_pylist()
        stages_col = table[col.CANDIDATE_ERROR_STAGE].to_pylist()
        kinds_col = table[col.CANDIDATE_ERROR_KIND].to_pylist()
        done = errors = tokens = 0
        num_tokens = table[col.NUM_TOKENS].to_pylist()
        for i, group in enumerate(groups):
            n = len(num_tokens[i])
            values = outcome.get(i)
            if group is None:
                step_scores.append([None] * n)
                errors += max(n, 1)
                continue
            for k, v in enumerate(values):
                if isinstance(v, Failure):
                    errors_col[i][k], stages_col[i][k], kinds_col[i][k] = v.message, STAGE, v.kind
                    values[k] = None
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
        for name, values in (
            (col.CANDIDATE_ERROR, errors_col),
            (col.CANDIDATE_ERROR_STAGE, stages_col),
            (col.CANDIDATE_ERROR_KIND, kinds_col),
        ):
            out = out.set_column(out.column_names.index(name), name, pa.array(values, pa.list_(pa.string())))
        return out.append_column(col.STEP_SCORES, pa.array(step_scores, pa.list_(pa.list_(pa.float32()))))
