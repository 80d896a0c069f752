"""Progress a person watching a long job wants: a periodic line that reads well in non-TTY logs.

Scoring actors report counts to one small named actor (fire-and-forget, so reporting never slows
scoring); the driver prints ``scored / errored / rows/s`` every ``progress_interval_s`` seconds.
Ray Data's own progress bars stay on for terminals.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any


def _actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        """Job-wide counts, also exported as Ray metrics (Prometheus, via the Ray dashboard's agent)."""

        def __init__(self) -> None:
            from ray.util.metrics import Counter, Gauge, Histogram

            self.counts: dict[str, float] = {"scored": 0, "errored": 0, "tokens": 0}
            # Each stage's actors as they started (actor id -> node id): a pool that grew shows it here.
            self.started: dict[str, dict[str, str]] = {}
            # Every actor the job's pools created, from the first line of its constructor on.
            self.joined: set[str] = set()
            self.metrics = {
                "scored": Counter("visualprm_candidates_scored", description="Candidates scored."),
                "errored": Counter(
                    "visualprm_candidates_errored", description="Candidates with an error row."
                ),
                "tokens": Counter("visualprm_tokens_scored", description="Language-model tokens scored."),
            }
            self.batch_latency = Histogram(
                "visualprm_score_batch_seconds",
                description="Seconds a scoring actor spends on one batch.",
                boundaries=[0.1, 0.3, 1, 3, 10, 30, 100],
            )
            # Groups prepared but not yet scored: the queue in front of the scoring actors.
            self.queue = Gauge(
                "visualprm_groups_waiting_for_scoring", description="Prepared, not yet scored."
            )

        def add(self, **counts: float) -> None:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + v
                if k in self.metrics and v:
                    self.metrics[k].inc(v)
            if "score_s" in counts:
                self.batch_latency.observe(counts["score_s"])
            self.queue.set(self.counts.get("groups_prepared", 0) - self.counts.get("groups_scored", 0))
            if "scored" in counts:
                # Wall-clock times of the first and last scoring report: start-up vs steady state.
                now = time.time()
                if "first_report" not in self.counts:
                    self.counts["first_report"] = now
                    self.counts["first_batch"] = counts["scored"]
                self.counts["last_report"] = now

        def started_on(self, stage: str, actor_id: str, node_id: str) -> None:
            self.started.setdefault(stage, {})[actor_id] = node_id

        def joined_job(self, actor_id: str) -> None:
            self.joined.add(actor_id)

        def actor_ids(self) -> list[str]:
            return sorted(self.joined)

        def snapshot(self) -> dict[str, float]:
            return dict(self.counts)

        def started_actors(self) -> dict[str, dict[str, str]]:
            return {stage: dict(actors) for stage, actors in self.started.items()}

    return ProgressCounter


class ProgressReporter:
    """The scoring actors' side: adds counts to the job's counter actor."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @classmethod
    def connect(cls, name: str) -> ProgressReporter | None:
        import ray

        try:
            return cls(ray.get_actor(name))
        except ValueError:  # no counter (a test running the stage alone): report nothing
            return None

    def add(self, **counts: int) -> None:
        self.handle.add.remote(**counts)

    def joined(self) -> None:
        """Record this actor as one of the job's, so that the job's end ends it (see
        :meth:`ProgressPrinter.__exit__`). Called first thing in a stage's constructor."""
        import ray

        self.handle.joined_job.remote(ray.get_runtime_context().get_actor_id() or "")

    def started(self, stage: str) -> None:
        """Record that this actor of ``stage`` started, and on which node."""
        import ray

        context = ray.get_runtime_context()
        self.handle.started_on.remote(stage, context.get_actor_id() or "", context.get_node_id())


class ProgressPrinter:
    """The driver's side: owns the counter actor and prints a line every ``interval`` seconds."""

    def __init__(self, name: str, interval: float, total: int | None = None, emit=print) -> None:
        self.name = name
        self.interval = interval
        self.total = total
        self.emit = emit
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a counter on a preemptible worker could vanish mid-job and take
        # the final counts with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = _actor_class().options(name=name, lifetime=None, scheduling_strategy=here).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="visualprm-progress")
        self.start_time = time.monotonic()

    def snapshot(self) -> dict[str, int]:
        import ray

        return ray.get(self.actor.snapshot.remote())

    def started_actors(self) -> dict[str, dict[str, str]]:
        import ray

        return ray.get(self.actor.started_actors.remote())

    def line(self) -> str:
        counts = self.snapshot()
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        done = counts["scored"] + counts["errored"]
        total = f"/{self.total}" if self.total is not None else ""
        queue = counts.get("groups_prepared", 0) - counts.get("groups_scored", 0)
        # Human-readable and key=value parseable, so it reads well in non-TTY job logs.
        return (
            f"[visualprm-ray] progress done={done:.0f}{total} scored={counts['scored']:.0f} "
            f"errored={counts['errored']:.0f} rows_per_s={counts['scored'] / elapsed:.2f} "
            f"tokens_per_s={counts['tokens'] / elapsed:.0f} queue_groups={queue:.0f} elapsed_s={elapsed:.0f}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.emit(self.line())
            except Exception as exc:  # progress must never take the job down
                self.emit(f"[visualprm-ray] progress unavailable: {exc}")

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            end_actors(ray.get(self.actor.actor_ids.remote()))
        finally:
            ray.kill(self.actor)


def end_actors(actor_ids: list[str]) -> None:
    """End the job's stage actors, finished or not.

    Ray Data lets an actor pool go by dropping its handles, and Ray ends an actor once no handle
    refers to it. After a failed job that is not enough: a task still in flight on an actor when
    the job failed keeps a completion callback, and through it the actor's handle, registered in
    Ray's core worker, so the actor lives on holding its CPUs (or GPU), and the next job on the same
    Ray waits forever for resources that never free up (seen with ``runtime.on_error: raise``).
    ``ray.kill`` needs a handle; the pools' handles are Ray Data's, so the kill goes by actor id
    through the core worker, as ``ray.kill`` itself does.
    """
    import ray
    from ray.exceptions import ActorHandleNotFoundError

    core = ray._private.worker.global_worker.core_worker
    for actor_id in actor_ids:
        # Not found: its handles are gone already, and so is the actor (or it is on its way out).
        with contextlib.suppress(ActorHandleNotFoundError):
            core.kill_actor(ray.ActorID.from_hex(actor_id), True)
