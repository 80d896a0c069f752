"""The test-only fault hook: inert unless asked for, and the simulated OOM behaves like a device's."""

from __future__ import annotations

import json

import pytest

from visualprm_ray.job import faults


def test_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.active_plan() is None
    assert faults.forwarded_env() == {}


def test_plan_from_the_variable_and_kill_counting(monkeypatch, tmp_path):
    text = json.dumps({"kill_on": ["g1"], "kill_times": 2, "state_dir": str(tmp_path)})
    monkeypatch.setenv(faults.ENV, text)
    plan = faults.active_plan()
    assert plan.kill_on == ["g1"] and plan.oom_over_tokens is None
    assert faults.forwarded_env() == {faults.ENV: text}  # what the driver hands the actors
    (tmp_path / "kills-g1.log").write_text("101\n102\n")
    assert plan.kills_so_far("g1") == 2
    plan.before_score(["g1", "g2"])  # both kills used up: returns instead of killing this process


def test_simulated_out_of_memory_counts_cached_tokens():
    import torch
    from transformers import DynamicCache

    calls = []
    wrapped = faults._OutOfMemoryOverTokens(lambda **kw: calls.append(kw) or "ok", limit=100)
    assert wrapped(inputs_embeds=torch.zeros(2, 50, 4)) == "ok"
    with pytest.raises(torch.OutOfMemoryError, match="101 tokens"):
        wrapped(inputs_embeds=torch.zeros(1, 101, 4))
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 30, 4), torch.zeros(1, 1, 30, 4), 0)
    with pytest.raises(torch.OutOfMemoryError, match="120 tokens"):  # 3 rows x (10 new + 30 cached)
        wrapped(inputs_embeds=torch.zeros(3, 10, 4), past_key_values=cache)
    assert len(calls) == 1
