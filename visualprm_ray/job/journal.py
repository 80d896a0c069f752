"""Which groups an actor held when it died: the memory that outlives the actor.

Ray restarts a dead actor and retries its batch, but a *poison* group (one that kills the process
every time: a native crash in an image decoder or a kernel, an allocation the host cannot give)
would then kill it again, forever. The preparation and scoring actors therefore note in this small
named actor what they are about to work on and clear it when done, each stage under its own name.
A batch that comes back with notes still open was held by an actor that died; the retry works on
its groups one at a time, each under its own note, and a group whose solo note is found open
``max_crashes`` times is recorded as a ``preparer_crash`` / ``scorer_crash`` error instead of being
tried again. Every crash opens a note that is never closed, so the number of retries is bounded by
(groups per batch x max_crashes + 1) by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class CrashJournal:
        def __init__(self) -> None:
            self.batch_open: dict[str, int] = {}
            self.solo_open: dict[str, int] = {}

        def begin_batch(self, stage: str, ids: list[str]) -> int:
            """Open a note for each id; returns how many earlier batch notes were left open."""
            keys = [(stage, i) for i in ids]
            earlier = max((self.batch_open.get(k, 0) for k in keys), default=0)
            for k in keys:
                self.batch_open[k] = self.batch_open.get(k, 0) + 1
            return earlier

        def begin_solo(self, stage: str, group_id: str) -> int:
            """Open a note for one group worked on alone; returns how many such notes were left open."""
            key = (stage, group_id)
            earlier = self.solo_open.get(key, 0)
            self.solo_open[key] = earlier + 1
            return earlier

        def end(self, stage: str, ids: list[str]) -> None:
            for i in ids:
                self.batch_open.pop((stage, i), None)
                self.solo_open.pop((stage, i), None)

        def open_notes(self) -> dict[str, dict[str, int]]:
            return {
                "batch": {f"{s}:{i}": n for (s, i), n in self.batch_open.items()},
                "solo": {f"{s}:{i}": n for (s, i), n in self.solo_open.items()},
            }

    return CrashJournal


def start_journal(name: str):
    """Create the job's journal on the driver's node (owned by the driver, so it ends with the job).

    Pinned there because the journal must outlive the scoring actors' nodes: on a preemptible
    worker node it could vanish with the very crash it is meant to record.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _actor_class().options(name=name, scheduling_strategy=here).remote()


class JournalClient:
    """What an actor of one stage holds: a handle to the job's journal, with blocking calls.

    The calls block on purpose: a note must be on record *before* the work it covers starts,
    or a crash during that work would leave no trace.
    """

    def __init__(self, name: str, stage: str) -> None:
        import ray

        self._ray = ray
        self._actor = ray.get_actor(name)
        self.stage = stage

    def begin_batch(self, ids: list[str]) -> int:
        return self._ray.get(self._actor.begin_batch.remote(self.stage, ids))

    def begin_solo(self, group_id: str) -> int:
        return self._ray.get(self._actor.begin_solo.remote(self.stage, group_id))

    def end(self, ids: list[str]) -> None:
        self._ray.get(self._actor.end.remote(self.stage, ids))


def run_isolated(
    journal: JournalClient | None,
    ids: Sequence[str],
    items: Sequence[T],
    *,
    batch: Callable[[Sequence[str], Sequence[T]], list[R]],
    crashed: Callable[[T, int], R],
    max_crashes: int,
) -> list[R]:
    """``batch(ids, items)`` under the journal's notes, one result per item.

    After an earlier attempt at this batch died with its actor, the items are worked on one at a
    time; one whose solo attempts died ``max_crashes`` times gets ``crashed(item, crashes)``.
    """
    if journal is None:
        return batch(ids, items)
    if journal.begin_batch(list(ids)) == 0:
        results = batch(ids, items)
        journal.end(list(ids))
        return results
    results: list[R] = []
    for group_id, item in zip(ids, items, strict=True):
        crashes = journal.begin_solo(group_id)
        results.extend([crashed(item, crashes)] if crashes >= max_crashes else batch([group_id], [item]))
        journal.end([group_id])
    return results
