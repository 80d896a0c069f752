"""Test-only fault injection for the scoring actors; inert unless ``VISUALPRM_FAULTS`` is set.

The reliability tests need real faults in real actors: a process killed with SIGKILL in the middle
of a batch, a device running out of memory on a large forward. Nothing in this module runs in
production: without the environment variable :func:`active_plan` returns None and the stage
never calls into it. The driver forwards the variable to the scoring actors through their
runtime environment, so a test can set it before starting a job on an already running local Ray.

``VISUALPRM_FAULTS`` holds JSON:

- ``kill_on``: group ids; the scoring actor SIGKILLs itself when about to score a set of groups
  that contains one of them;
- ``kill_times``: how many times per id (default 1; -1 for every time, a poison row);
- ``state_dir``: a directory where the kills are counted (the actor's memory dies with it);
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
    kill_times: int = 1
    state_dir: str | None = None
    oom_over_tokens: int | None = None

    def kills_so_far(self, group_id: str) -> int:
        log = self._log(group_id)
        return len(log.read_text().splitlines()) if log.exists() else 0

    def _log(self, group_id: str) -> Path:
        if self.state_dir is None:
            raise ValueError(f"{ENV}: kill_on needs a state_dir to count kills in")
        safe = "".join(c if c.isalnum() else "_" for c in group_id)
        return Path(self.state_dir) / f"kills-{safe}.log"

    def before_score(self, ids: list[str]) -> None:
        """Kill this process if the plan says so for one of ``ids``."""
        for group_id in ids:
            if group_id not in self.kill_on:
                continue
            if self.kill_times >= 0 and self.kills_so_far(group_id) >= self.kill_times:
                continue
            with self._log(group_id).open("a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


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
