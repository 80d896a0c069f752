"""`visualprm-ray eval-bon` on the real output table of a finished demo run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.evaluate.bon import METHODS

pytestmark = pytest.mark.slow


def test_eval_bon_on_the_demo_output(demo_run, tmp_path, capsys):
    workdir, manifest = demo_run
    out = tmp_path / "bon.json"
    code = main(
        [
            "eval-bon",
            str(workdir / "scores"),
            "--answer-column",
            "answer",
            "--group-by",
            "policy",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    print(capsys.readouterr().out)
    result = json.loads(out.read_text())
    overall, by_group = result["overall"], result["by_group"]

    counts = manifest["counts"]
    assert overall["groups"] == counts["groups_in"]
    assert overall["candidates"] == counts["candidates_in"]
    assert overall["errored_candidates"] == counts["errored"]
    assert result["skipped_groups_without_reference"] == 0
    assert sorted(by_group) == ["policy-a", "policy-b"]
    for key in ("groups", "candidates", "errored_candidates", "unanswered_candidates", "all_errored_groups"):
        assert sum(t[key] for t in by_group.values()) == overall[key], key
    for method in METHODS:
        assert sum(t["correct"][method] for t in by_group.values()) == overall["correct"][method], method
    for tally in [overall, *by_group.values()]:
        for method in METHODS:
            assert tally["correct"][method] <= tally["correct"]["oracle"], method
            assert tally["accuracy"][method] == pytest.approx(tally["correct"][method] / tally["groups"])

    # The sample data boxes the reference answer in every correct response and a different value in
    # every wrong one, and each group has a correct one: checked here with plain string tests.
    rows = pq.read_table(workdir / "scores").to_pylist()
    right = {
        (r["id"], r["candidate_index"]) for r in rows if r["response"].endswith(f"\\boxed{{{r['answer']}}}")
    }
    assert overall["unanswered_candidates"] == 0
    assert overall["correct"]["oracle"] == len({gid for gid, _ in right}) == overall["groups"]
    assert overall["correct"]["first"] == sum(1 for _, k in right if k == 0)
    best = {r["id"] for r in rows if r["is_best"] and (r["id"], r["candidate_index"]) in right}
    assert overall["correct"]["best_score"] == len(best)  # the job's own is_best picks the same
