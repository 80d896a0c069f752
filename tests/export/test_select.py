"""Which rows a group gives in each format, and why a group gives none: one group at a time, no Ray."""

from __future__ import annotations

import pytest

from visualprm_ray.export.select import (
    FIRST,
    INPUT_SIDE,
    REASON,
    SCORE_SIDE,
    Selection,
    select_group,
    select_table,
    selected_schema,
    union_schema,
)
from visualprm_ray.job import stages as col


def _input(responses, *, steps=None, file=0, row=3, given=None, question="What is x?"):
    return {
        col.ID: "g",
        "_vp_side": INPUT_SIDE,
        col.QUESTION: question,
        col.RESPONSES: responses,
        col.STEPS: steps,
        "_vp_given_index": given,
        col.FILE: file,
        col.ROW: row,
        "candidate_index": None,
        "step_scores": None,
        "score": None,
        "rank": None,
        "is_best": None,
        "error": None,
    }


def _score(index, step_scores, *, rank, best=False, error=None, policy="p"):
    scored = error is None
    return {
        col.ID: "g",
        "_vp_side": SCORE_SIDE,
        col.QUESTION: None,
        col.RESPONSES: None,
        col.STEPS: None,
        "_vp_given_index": None,
        col.FILE: None,
        col.ROW: None,
        "candidate_index": index,
        "step_scores": step_scores if scored else None,
        "score": sum(step_scores) / len(step_scores) if scored else None,
        "rank": rank if scored else None,
        "is_best": best if scored else None,
        "error": error,
        "policy": policy,
    }


RESPONSES = ["a1\n\na2", "b1\n\nb2\n\nb3", "c1", "d1\n\nd2"]


def _group(errors=(None, None, None, None)):
    # Scores 0.5, 0.9, 0.2, 0.6 -> ranks 2, 0, 3, 1 (candidate 2 the lowest).
    scores = [[0.4, 0.6], [0.9, 0.8, 1.0], [0.2], [0.6, 0.6]]
    ranks = [2, 0, 3, 1]
    rows = [_input(RESPONSES)]
    for k in range(4):
        rows.append(_score(k, scores[k], rank=ranks[k], best=ranks[k] == 0, error=errors[k], policy=f"p{k}"))
    return rows


def test_dpo_pairs_the_best_with_the_lowest_and_takes_the_chosen_passthrough():
    (row,) = select_group(_group(), Selection("dpo", passthrough=("policy",)))
    assert row["chosen"] == RESPONSES[1] and row["rejected"] == RESPONSES[2]
    assert (row["chosen_index"], row["rejected_index"]) == (1, 2)
    assert row["chosen_score"] == pytest.approx(0.9) and row["rejected_score"] == pytest.approx(0.2)
    assert row["policy"] == "p1" and row[col.QUESTION] == "What is x?"
    assert (row[col.IMAGE_FILE], row[col.IMAGE_ROW]) == (0, 3)
    assert REASON not in row


def test_dpo_never_pairs_an_errored_candidate_and_needs_two_scored():
    # The lowest (candidate 2) errored: the next lowest scored one (candidate 0) is rejected.
    (row,) = select_group(_group(errors=(None, None, "bad image", None)), Selection("dpo"))
    assert (row["chosen_index"], row["rejected_index"]) == (1, 0)
    (row,) = select_group(_group(errors=("x", None, "x", "x")), Selection("dpo"))
    assert row[REASON] == "one_scored_candidate"
    (row,) = select_group(_group(errors=("x", "x", "x", "x")), Selection("dpo"))
    assert row[REASON] == "no_scored_candidate"


def test_dpo_margin_is_at_least_min_margin():
    assert select_group(_group(), Selection("dpo", min_margin=0.7))[0]["chosen_index"] == 1  # 0.9 - 0.2
    assert select_group(_group(), Selection("dpo", min_margin=0.71))[0][REASON] == "below_min_margin"


def test_sft_takes_the_best_at_or_over_min_score():
    (row,) = select_group(_group(), Selection("sft", min_score=0.9))
    assert row["completion"] == RESPONSES[1] and row["candidate_index"] == 1
    assert select_group(_group(), Selection("sft", min_score=0.95))[0][REASON] == "below_min_score"


def test_prm_gives_every_scored_candidate_with_its_steps_and_labels():
    rows = select_group(_group(errors=(None, None, "x", None)), Selection("prm", threshold=0.55))
    assert [r["candidate_index"] for r in rows] == [0, 1, 3]
    assert rows[0]["completions"] == ["a1", "a2"] and rows[0]["labels"] == [False, True]
    assert rows[1]["completions"] == ["b1", "b2", "b3"] and rows[1]["labels"] == [True, True, True]
    assert rows[2]["labels"] == [True, True]  # 0.6 > 0.55


def test_prm_steps_split_as_the_job_split_them_and_given_steps_kept():
    # scoring.max_steps merges pieces as the job did: 3 pieces in chunks of 2 -> 2 steps.
    rows = _group()
    rows[2]["step_scores"], rows[2]["score"] = [0.9, 0.8], 0.85
    out = select_group(rows, Selection("prm", max_steps=2))
    assert out[1]["completions"] == ["b1\n\nb2", "b3"]
    # Pre-split steps (input.steps_column) are the steps, whatever the response says.
    given = _group()
    given[0] = _input(RESPONSES, steps=[["A1", "A2"], ["B1", "B2", "B3"], ["C"], ["D1", "D2"]])
    assert select_group(given, Selection("prm"))[1]["completions"] == ["B1", "B2", "B3"]


def test_a_truncated_candidate_keeps_the_steps_that_were_scored():
    rows = _group()
    rows[2]["step_scores"] = [0.9, 0.8]  # 3 steps, 2 scored (scoring.context_policy: truncate)
    out = select_group(rows, Selection("prm"))
    assert out[1]["completions"] == ["b1", "b2"]


def test_flat_input_rows_are_numbered_in_input_order_or_by_the_given_index():
    scores = _group()[1:]
    flat = [_input([r], file=0, row=10 + k) for k, r in enumerate(RESPONSES)]
    (row,) = select_group([*reversed(flat), *scores], Selection("dpo", layout="flat"))
    assert row["chosen"] == RESPONSES[1] and (row[col.IMAGE_FILE], row[col.IMAGE_ROW]) == (0, 10)
    given = [_input([r], file=0, row=10 + k, given=3 - k) for k, r in enumerate(RESPONSES)]
    (row,) = select_group([*given, *scores], Selection("dpo", layout="flat"))
    assert row["chosen"] == RESPONSES[2]  # candidate_index 1 is the row given index 1: the third


def test_groups_on_one_side_only_are_counted_not_lost():
    assert select_group(_group()[:1], Selection("sft"))[0][REASON] == "not_in_scores"
    assert select_group(_group()[1:], Selection("sft"))[0][REASON] == "not_in_input"


def test_an_input_that_is_not_the_scored_one_is_loud():
    rows = _group()
    rows[0] = _input(RESPONSES[:1])  # candidate 1 was scored, the input has no response for it
    with pytest.raises(ValueError, match="is --input the input these scores were made from"):
        select_group(rows, Selection("sft"))


def test_the_map_groups_function_marks_the_first_row_and_keeps_the_schema():
    import pyarrow as pa

    selection = Selection("prm", passthrough=("policy",))
    passthrough = [pa.field("policy", pa.string())]
    table = pa.Table.from_pylist(_group(), schema=union_schema(passthrough))
    out = select_table(table, selection=selection, schema=selected_schema(selection, passthrough))
    assert out.schema == selected_schema(selection, passthrough)
    assert out[FIRST].to_pylist() == [True, None, None, None]


def test_a_candidate_held_twice_by_an_unfinished_run_counts_once():
    rows = _group()
    rows += [dict(r) for r in rows[1:]]  # every score row again (a file a resume would remove)
    (row,) = select_group(rows, Selection("dpo"))
    assert (row["chosen_index"], row["rejected_index"]) == (1, 2)
    assert len(select_group(rows, Selection("prm"))) == 4
