"""Real faults in real scoring actors, injected by the test-only hook (``VISUALPRM_FAULTS``).

- an actor SIGKILLed in the middle of a batch is restarted and the batch retried: same scores;
- a group that kills the actor every time is isolated and recorded as ``scorer_crash`` after a
  bounded number of deaths, while its batch neighbours are scored;
- a device out of memory splits the work until it fits; only a candidate too big even alone
  is recorded as ``out_of_memory``;
- an actor pool that can never be placed ends the job with a clear message instead of a hang.
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
from reference import in_process_step_scores

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.driver import run_job
from visualprm_ray.job.faults import ENV
from visualprm_ray.model.prm import VisualPRM
from visualprm_ray.sample_data import make_groups, write_shards

pytestmark = pytest.mark.slow

GROUPS = make_groups(8, candidates=3, seed=5)
GROUPS_PER_BATCH = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-in")
    write_shards(root, GROUPS, 2)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Step scores of every candidate, in process, the plain way."""
    return in_process_step_scores(tiny_model, GROUPS)


def _run(inputs, tiny_model, out, *extra: str):
    config = JobConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            "runtime.cpus_per_preparer=0.5",
            f"runtime.groups_per_batch={GROUPS_PER_BATCH}",
            "input.num_blocks=2",
            "output.mode=overwrite",
            *extra,
        ],
        input_uri=str(inputs),
        output_uri=str(out),
        model_source=str(tiny_model),
    )
    started = time.perf_counter()
    manifest = run_job(config, emit=lambda *_: None)
    rows = pq.read_table(out).to_pylist()
    print(f"job with faults took {time.perf_counter() - started:.1f}s")
    return manifest, {(r["id"], r["candidate_index"]): r for r in rows}


def _faults(monkeypatch, state, **plan) -> None:
    state.mkdir(exist_ok=True)
    monkeypatch.setenv(ENV, json.dumps({"state_dir": str(state), **plan}))


def _kills(state) -> list[str]:
    return [line for f in sorted(state.glob("kills-*.log")) for line in f.read_text().splitlines()]


def test_actor_killed_mid_batch_is_restarted_and_its_batch_retried(
    ray_local, inputs, tiny_model, reference, tmp_path, monkeypatch
):
    victim = GROUPS[1]["id"]
    _faults(monkeypatch, tmp_path / "state", kill_on=[victim], kill_times=1)
    manifest, rows = _run(inputs, tiny_model, tmp_path / "out")
    assert len(_kills(tmp_path / "state")) == 1  # the actor really died once
    assert len(rows) == 24 and manifest["counts"]["errored"] == 0
    for key, row in rows.items():
        assert row["error"] is None
        assert row["step_scores"] == pytest.approx(reference[key], abs=1e-4), key


def test_poison_group_is_isolated_and_recorded_after_bounded_deaths(
    ray_local, inputs, tiny_model, reference, tmp_path, monkeypatch
):
    poison = GROUPS[2]["id"]
    _faults(monkeypatch, tmp_path / "state", kill_on=[poison], kill_times=-1)
    manifest, rows = _run(inputs, tiny_model, tmp_path / "out", "runtime.max_crashes_per_group=2")
    kills = _kills(tmp_path / "state")
    # One death with the whole batch, then max_crashes_per_group deaths with the group alone.
    assert len(kills) == 1 + 2
    assert len(set(kills)) == 3  # three different actor processes: each death was a real restart
    for key, row in rows.items():
        if key[0] == poison:
            assert row["error_kind"] == "scorer_crash" and row["error_stage"] == "score"
            assert "died 2 time(s)" in row["error"] and row["step_scores"] is None
        else:  # its batch neighbours too
            assert row["error"] is None
            assert row["step_scores"] == pytest.approx(reference[key], abs=1e-4), key
    assert manifest["counts"]["errors_by_kind"] == {"scorer_crash": 3}
    assert manifest["counts"]["scored"] == 21


def test_out_of_memory_splits_the_work_and_records_only_what_cannot_fit(
    ray_local, inputs, tiny_model, reference, tmp_path, monkeypatch
):
    # Sized from the data: every candidate fits alone (prefix + its suffix), a batch does not;
    # the longest candidate is made not to fit at all.
    prm = VisualPRM.from_pretrained(tiny_model, device="cpu", dtype="float32")
    lengths = {
        (g["id"], k): len(prm.prepare(g["question"], g["responses"], [g["image"]]).full_sequence(k))
        for g in GROUPS
        for k in range(3)
    }
    longest = max(lengths, key=lengths.get)
    limit = max(v for k, v in lengths.items() if k != longest)
    assert lengths[longest] > limit, "the sample data needs one candidate longer than the others"
    _faults(monkeypatch, tmp_path / "state", oom_over_tokens=limit)
    manifest, rows = _run(inputs, tiny_model, tmp_path / "out", "runtime.max_crashes_per_group=2")
    for key, row in rows.items():
        if key == longest:
            assert row["error_kind"] == "out_of_memory" and row["error_stage"] == "score"
            assert f"({lengths[longest]} tokens" in row["error"]
        else:
            assert row["error"] is None, (key, row["error"])
            assert row["step_scores"] == pytest.approx(reference[key], abs=1e-4), key
    # Ranks come from the scored neighbours only; the candidate that did not fit is not ranked.
    group = [rows[(longest[0], k)] for k in range(3)]
    assert sorted(r["rank"] for r in group if r["rank"] is not None) == [0, 1]
    assert manifest["counts"]["errors_by_kind"] == {"out_of_memory": 1}


def test_unplaceable_actor_pool_ends_with_a_clear_message(ray_local, inputs, tiny_model, tmp_path):
    started = time.perf_counter()
    with pytest.raises(Exception, match="made no progress") as info:
        _run(inputs, tiny_model, tmp_path / "out", "runtime.cpus_per_scorer=64", "runtime.stall_timeout_s=15")
    assert time.perf_counter() - started < 120
    assert "MapBatches(ScoreStage)" in str(info.value)


def test_actors_that_fail_to_start_are_replaced_and_the_job_completes(
    ray_local, inputs, tiny_model, reference, tmp_path, monkeypatch
):
    """The first two constructions of each stage's actors raise (a throttled model download, a
    bad GPU): they are replaced, with backoff, and the job completes with the same scores."""
    state = tmp_path / "state"
    _faults(monkeypatch, state, fail_start={"score": 2, "prepare": 2})
    manifest, rows = _run(inputs, tiny_model, tmp_path / "out")
    for stage in ("score", "prepare"):
        assert len((state / f"start-{stage}.log").read_text().splitlines()) == 2, stage
    assert len(rows) == 24 and manifest["counts"]["errored"] == 0
    for key, row in rows.items():
        assert row["step_scores"] == pytest.approx(reference[key], abs=1e-4), key


def test_a_pool_that_cannot_start_at_all_fails_naming_the_cause(
    ray_local, inputs, tiny_model, tmp_path, monkeypatch
):
    from visualprm_ray.job.driver import ActorStartError

    state = tmp_path / "state"
    _faults(monkeypatch, state, fail_start={"score": -1})
    started = time.perf_counter()
    with pytest.raises(ActorStartError, match="simulated start-up failure of a score actor"):
        _run(inputs, tiny_model, tmp_path / "out", "runtime.max_actor_start_failures=2")
    assert time.perf_counter() - started < 180
    # Bounded: the budget's failures in a row, plus the ones already starting when it ran out.
    assert 3 <= len((state / "start-score.log").read_text().splitlines()) <= 6


@pytest.mark.parametrize("layout", ["grouped", "flat"])
def test_a_group_that_kills_the_preparer_every_time_is_recorded(
    layout, ray_local, tiny_model, reference, tmp_path, monkeypatch
):
    root = tmp_path / "in"
    write_shards(root, GROUPS, 2, layout=layout)
    poison = GROUPS[5]["id"]
    state = tmp_path / "state"
    _faults(monkeypatch, state, prepare_kill_on=[poison], kill_times=-1)
    manifest, rows = _run(root, tiny_model, tmp_path / "out", "runtime.max_crashes_per_group=2")
    kills = (state / f"prepare-kills-{poison.replace('-', '_')}.log").read_text().splitlines()
    assert len(kills) == 1 + 2 and len(set(kills)) == 3  # real deaths of three preparer processes
    for key, row in rows.items():
        if key[0] == poison:
            assert row["error_kind"] == "preparer_crash" and row["error_stage"] == "prepare", row
            assert "died 2 time(s)" in row["error"]
        else:
            assert row["error"] is None, (key, row["error"])
            assert row["step_scores"] == pytest.approx(reference[key], abs=1e-4), key
    assert manifest["counts"]["errors_by_kind"] == {"preparer_crash": 3}
    assert manifest["counts"]["scored"] == 21


def test_a_crowded_cluster_is_said_at_the_start(ray_local, tmp_path):
    """CPUs that other work holds: the job says at the start that its pools will wait, and what
    makes them smaller, instead of leaving the wait to the stall timeout."""
    from visualprm_ray.job.driver import _crowded
    from visualprm_ray.job.layout import Resources

    config = JobConfig.from_sources(
        None, [], input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_source="m"
    )
    resources = Resources(device="cpu", num_scorers=1, gpus_per_scorer=0, num_preparers=1)
    assert _crowded(config, resources) is None  # 4 CPUs free, 3 needed

    @ray_local.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray_local.get(holder.ready.remote())
        message = _crowded(config, resources)
        assert message is not None and "2 CPU(s) of the cluster are free now" in message
        assert "need 3" in message and "runtime.num_preparers" in message
    finally:
        ray_local.kill(holder)
