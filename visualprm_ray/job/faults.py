"""Test-only fault injection for the scoring actors; inert unless ``VISUALPRM_FAULTS`` is set.

The reliability tests need real faults in real actors: a process killed with SIGKILL in the middle
of a batch, a device running out of memory on a large forward. Nothing in this module runs in
production: without the environment variable :func:`active_plan` returns None and the stage
never calls into it. The driver forwards the variable to the scoring actors through their
runtime environment, so a test can set it before starting a job on an already running local Ray.

``VISUALPRM_FAULTS`` holds JSON:

- ``kill_on``: group ids; the scoring actor SIGKILLs itself when about to score a set of groups
  that contains one of them;
- ``prepare_kill_on``: the same for the preparation actors, about to prepare such a group;
- ``kill_times``: how many times per id (default 1; -1 for every time, a poison row);
- ``fail_start``: ``{"prepare": n, "score": n}``: the first n constructions of that stage's
  actors raise, as a model download that keeps failing or a bad GPU would;
- ``state_dir``: a directory where the kills and failed starts are counted (an actor's memory
  dies with it);
- ``score_delay_s``: sleep this long before scoring each batch, as a slower device would (the
  scorers are then the pipeline's bottleneck: a pool-growth test needs a backlog);
- ``oom_over_tokens``: make every language-model forward that attends over more than this many
  tokens (each row's or packed candidate's new tokens plus the prefix it attends to) raise
  ``torch.OutOfMemoryError``, as a GPU would.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "VISUALPRM_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    kill_on: list[str] = field(default_factory=list)
    prepare_kill_on: list[str] = field(default_factory=list)
    kill_times: int = 1
    fail_start: dict[str, int] = field(default_factory=dict)
    state_dir: str | None = None
    oom_over_tokens: int | None = None
    score_delay_s: float = 0.0

    def kills_so_far(self, group_id: str, stage: str = "score") -> int:
        return self._count(self._log(group_id, stage))

    def _count(self, log: Path) -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    def _log(self, group_id: str, stage: str = "score") -> Path:
        if self.state_dir is None:
            raise ValueError(f"{ENV}: kills and failed starts need a state_dir to be counted in")
        safe = "".join(c if c.isalnum() else "_" for c in group_id)
        prefix = "kills" if stage == "score" else f"{stage}-kills"
        return Path(self.state_dir) / f"{prefix}-{safe}.log"

    def _note(self, log: Path) -> None:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")

    def before_score(self, ids: list[str]) -> None:
        """Kill this process if the plan says so for one of ``ids``; then wait, if it says so."""
        self._maybe_kill(ids, self.kill_on, "score")
        if self.score_delay_s:
            import time

            time.sleep(self.score_delay_s)

    def before_prepare(self, ids: list[str]) -> None:
        self._maybe_kill(ids, self.prepare_kill_on, "prepare")

    def _maybe_kill(self, ids: list[str], targets: list[str], stage: str) -> None:
        for group_id in ids:
            if group_id not in targets:
                continue
            if self.kill_times >= 0 and self.kills_so_far(group_id, stage) >= self.kill_times:
                continue
            self._note(self._log(group_id, stage))
            os.kill(os.getpid(), signal.SIGKILL)

    def before_start(self, stage: str) -> None:
        """Raise if this stage's actors are still to fail their start."""
        times = self.fail_start.get(stage, 0)
        if not times:
            return
        if self.state_dir is None:
            raise ValueError(f"{ENV}: fail_start needs a state_dir to count failed starts in")
        log = Path(self.state_dir) / f"start-{stage}.log"
        if times >= 0 and self._count(log) >= times:
            return
        self._note(log)
        raise RuntimeError(f"simulated start-up failure of a {stage} actor ({ENV})")


def active_plan() -> FaultPlan | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    return FaultPlan(**json.loads(text))


def forwarded_env() -> dict[str, str]:
    """The fault variable for an actor's runtime environment; empty (nothing to forward) normally."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


class _OutOfMemoryOverTokens:
    """Stands in for the language model: raises a CUDA-style OOM on forwards over the limit."""

    def __init__(self, model: Any, limit: int) -> None:
        self.model = model
        self.limit = limit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        embeds = kwargs["inputs_embeds"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        shared = kwargs.get("visualprm_prefix")
        # Every candidate attends over its own tokens and the prefix: copied per row into the
        # cache (prefix_cache) or shared by a packed row of candidates (shared_prefix); either
        # way the limit counts the same tokens.
        if shared:
            candidates = len(kwargs["visualprm_packing"].lengths)
            tokens = embeds.shape[1] + candidates * shared[0][0].shape[2]
        else:
            cached = cache.get_seq_length() if cache is not None else 0
            tokens = embeds.shape[0] * (embeds.shape[1] + cached)
        if tokens > self.limit:
            raise torch.OutOfMemoryError(
                f"simulated: a forward over {tokens} tokens, limit {self.limit} ({ENV})"
            )
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def install(plan: FaultPlan, scorer: Any) -> None:
    """Wrap ``scorer``'s language model for the simulated out-of-memory faults."""
    if plan.oom_over_tokens is not None:
        scorer._language_model = _OutOfMemoryOverTokens(scorer._language_model, plan.oom_over_tokens)
