"""Which groups a scoring actor held when it died: the memory that outlives the actor.

Ray restarts a dead actor and retries its batch, but a *poison* group (one that kills the process
every time: a native crash in a kernel, an allocation the host cannot give) would then kill it
again, forever. The scoring actors therefore note in this small named actor what they are about to
score and clear it when done. A batch that comes back with notes still open was held by an actor
that died; the retry scores its groups one at a time, each under its own note, and a group whose
solo note is found open ``max_crashes`` times is recorded as a ``scorer_crash`` error instead of
being tried again. Every crash opens a note that is never closed, so the number of retries is
bounded by (groups per batch x max_crashes + 1) by construction.
"""

from __future__ import annotations


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class CrashJournal:
        def __init__(self) -> None:
            self.batch_open: dict[str, int] = {}
            self.solo_open: dict[str, int] = {}

        def begin_batch(self, ids: list[str]) -> int:
            """Open a note for each id; returns how many earlier batch notes were left open."""
            earlier = max((self.batch_open.get(i, 0) for i in ids), default=0)
            for i in ids:
                self.batch_open[i] = self.batch_open.get(i, 0) + 1
            return earlier

        def begin_solo(self, group_id: str) -> int:
            """Open a note for one group scored alone; returns how many such notes were left open."""
            earlier = self.solo_open.get(group_id, 0)
            self.solo_open[group_id] = earlier + 1
            return earlier

        def end(self, ids: list[str]) -> None:
            for i in ids:
                self.batch_open.pop(i, None)
                self.solo_open.pop(i, None)

        def open_notes(self) -> dict[str, dict[str, int]]:
            return {"batch": dict(self.batch_open), "solo": dict(self.solo_open)}

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
    """What a scoring actor holds: a handle to the job's journal, with blocking calls.

    The calls block on purpose: a note must be on record *before* the work it covers starts,
    or a crash during that work would leave no trace.
    """

    def __init__(self, name: str) -> None:
        import ray

        self._ray = ray
        self._actor = ray.get_actor(name)

    def begin_batch(self, ids: list[str]) -> int:
        return self._ray.get(self._actor.begin_batch.remote(ids))

    def begin_solo(self, group_id: str) -> int:
        return self._ray.get(self._actor.begin_solo.remote(group_id))

    def end(self, ids: list[str]) -> None:
        self._ray.get(self._actor.end.remote(ids))
