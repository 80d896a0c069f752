"""The score stage on its own: its torch work stays on one thread, whoever calls it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from visualprm_ray.job import stages as col
from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.stages.prepare import PrepareStage
from visualprm_ray.job.stages.score import ScoreStage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    model = str(write_tiny_checkpoint(tmp_path_factory.mktemp("model"), seed=0))
    config = JobConfig.from_sources(
        None,
        ["model.dtype=float32", "images.max_tiles=1"],
        input_uri="/in",
        output_uri="/out",
        model_source=model,
    )
    rows = pa.table(
        {
            col.ID: ["g0", "g1"],
            col.QUESTION: ["What is 1+1?", "And 2+2?"],
            col.IMAGE: pa.nulls(2, pa.binary()),
            col.RESPONSES: [["It is 2.\n\nSo 2.", "It is 3."], ["4."]],
        }
    )
    return config, model, PrepareStage(config, model)(rows)


def test_model_load_and_every_batch_run_on_the_stages_own_thread(setup, monkeypatch):
    import visualprm_ray.model.checkpoint as checkpoint

    config, model, prepared = setup
    threads: dict[str, set[int]] = {"load": set(), "score": set()}
    real_load = checkpoint.load_checkpoint

    def load(*args, **kwargs):
        threads["load"].add(threading.get_ident())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    stage = ScoreStage(config, model, "cpu")
    real_score = stage.scorer.score

    def score(groups):
        threads["score"].add(threading.get_ident())
        return real_score(groups)

    stage.scorer.score = score
    from_main = stage(prepared)
    with ThreadPoolExecutor(max_workers=1) as caller:  # as Ray Data calls a UDF
        from_worker = caller.submit(stage, prepared).result()

    own = stage._torch_thread.submit(threading.get_ident).result()
    assert threads == {"load": {own}, "score": {own}}
    assert own != threading.get_ident()
    # Same scores from either caller.
    for a, b in zip(
        from_main[col.STEP_SCORES].to_pylist(), from_worker[col.STEP_SCORES].to_pylist(), strict=True
    ):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_an_error_inside_the_stage_reaches_the_caller(setup):
    config, model, prepared = setup
    stage = ScoreStage(config, model, "cpu")

    def broken(groups):
        raise KeyError("a bug in our code")

    stage.scorer.score = broken
    with pytest.raises(KeyError, match="a bug in our code"):
        stage(prepared)


def test_a_cpu_replica_runs_the_threads_the_driver_gave_it(setup):
    import torch

    config, model, prepared = setup
    before = torch.get_num_threads()
    stage = ScoreStage(config, model, "cpu", cpu_threads=1)
    assert stage._torch_thread.submit(torch.get_num_threads).result() == 1
    assert len(stage(prepared)) == 2
    # Without a share from the driver the configured count wins, then every core.
    torch.set_num_threads(before)
    stage = ScoreStage(
        config.model_copy(
            update={"runtime": config.runtime.model_copy(update={"cpu_threads_per_scorer": 3})}
        ),
        model,
        "cpu",
    )
    assert stage._torch_thread.submit(torch.get_num_threads).result() == 3
    torch.set_num_threads(before)


def test_the_configs_kernel_options_reach_the_scorer_with_the_same_scores(setup):
    config, model, prepared = setup
    fast = config.model_copy(
        update={
            "scoring": config.scoring.model_copy(
                update={"kernels": config.scoring.kernels.model_copy(update={"attention": "varlen"})}
            )
        }
    )
    stage = ScoreStage(fast, model, "cpu")
    assert stage.scorer.options.attention == "varlen" and stage.scorer.mode == "shared_prefix"
    plain = ScoreStage(config, model, "cpu")
    assert plain.scorer.options.attention == "padded"
    for a, b in zip(
        stage(prepared)[col.STEP_SCORES].to_pylist(),
        plain(prepared)[col.STEP_SCORES].to_pylist(),
        strict=True,
    ):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)
