"""Best-of-N: answer extraction and normalisation, and every method's accuracy on a table whose answers
are known by construction (written with the real output schema, read through the real command)."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visualprm_ray.cli import main
from visualprm_ray.evaluate.bon import METHODS, answer_key, extract_answer, last_boxed, normalize_answer
from visualprm_ray.schema import output_schema

# ------------------------------------------------------------------------------------------------
# Extraction and normalisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}} is it", r"\frac{1}{\sqrt{2}}"),  # nested braces kept
        (r"first \boxed{7}, rechecking: \boxed{8}.", "8"),  # several: the last one
        (r"\boxed{\boxed{5}}", "5"),  # last by start position
        (r"\boxed{3} then a truncated \boxed{\frac{1}{2", "3"),  # unterminated: the one before
        (r"\boxed {x+1}", "x+1"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        ("no answer at all", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_fallbacks_and_custom_regex():
    assert extract_answer("Step.\n\nFinal answer: \\boxed{12}") == "12"
    assert extract_answer("Step one.\n\nFinal answer: 42\n") == "42"
    assert extract_answer("final answer is: B\n\nFinal Answer: C") == "C"  # the last line, any case
    assert extract_answer("The result is 5.") is None
    assert extract_answer(None) is None
    pattern = re.compile(r"answer is (\w+)")
    assert extract_answer("the answer is 4, no, the answer is 5", pattern) == "5"
    assert extract_answer(r"\boxed{9}", pattern) is None  # a custom rule replaces the default
    assert extract_answer("ANSWER: 7", re.compile(r"\d+")) == "7"  # no group: the whole match


def test_normalisation_and_comparison():
    assert normalize_answer("  $3.0$. ") == "3.0"
    assert normalize_answer("$5.$") == "5"
    assert normalize_answer(" $ $ ") is None
    assert answer_key("3.0") == answer_key("3") == answer_key(" $3$.") == Decimal(3)
    assert answer_key("1e3") == answer_key("1000")
    assert answer_key("-0") == answer_key("0")
    assert answer_key("3.5") != answer_key("3")
    assert answer_key("ABC") == answer_key("abc") == "abc"
    assert answer_key(r"\frac{1}{2}") != answer_key("0.5")  # no symbolic maths: documented
    assert answer_key("nan") == "nan" and answer_key("NaN") == answer_key("nan")
    assert answer_key("") is None and answer_key(None) is None


# ------------------------------------------------------------------------------------------------
# A table with known answers. Scores are dyadic fractions, so sums and ties are exact.
# (response, score, score_min, score_last, error); score None = errored candidate.
# ------------------------------------------------------------------------------------------------

GROUPS = [
    # G1: majority ties 2-2 and the weighted vote ties 0.75-0.75: both go to 12, given first.
    (
        "g1",
        "a",
        "12",
        [
            (r"Area is 12.\n\nFinal answer: \boxed{12}", 0.25, 0.25, 0.25, None),
            (r"\boxed{13}", 0.75, 0.125, 0.875, None),
            (r"\boxed{12.0}", 0.5, 0.375, 0.125, None),
            (r"\boxed{13}", 0.0, 0.0, 0.0, None),
        ],
    ),
    # G2: best score ties 0.75 (c0 wins, wrong); an errored candidate still votes; one has no answer.
    (
        "g2",
        "a",
        r"\frac{1}{2}",
        [
            ("Step.\n\nFinal answer: \\boxed{\\frac{1}{3}}", 0.75, 0.125, 0.625, None),
            (r"\boxed{\frac{1}{2}}", 0.75, 0.5, 0.625, None),
            (r"\boxed{\frac{1}{2}}", None, None, None, "context too long"),
            ("I cannot tell.", 0.25, 0.25, 0.25, None),
        ],
    ),
    # G3: every candidate errored: the PRM methods are wrong, the PRM-free ones are not.
    (
        "g3",
        "b",
        "B",
        [(r"\boxed{b}", None, None, None, "bad image"), (r"\boxed{C}", None, None, None, "bad image")],
    ),
    # G4: a Final-answer line, "$7$." normalised, and two boxed values (the last one counts).
    (
        "g4",
        "b",
        "7",
        [
            ("Final answer: 8", 0.875, 0.875, 0.5, None),
            ("It is $7$.\n\nFinal answer: $7$.", 0.125, 0.125, 0.9375, None),
            (r"First \boxed{7}, but rechecking \boxed{8}", 0.25, 0.25, 0.25, None),
        ],
    ),
    # G5: a group-level error row (null candidate_index): no candidate, every method wrong.
    ("g5", "a", "5", [(None, None, None, None, "image not found")]),
    # G6: no reference answer: skipped.
    ("g6", "a", None, [(r"\boxed{1}", 0.5, 0.5, 0.5, None)]),
    # G7: majority (4, 2 votes) is wrong, the weighted vote and the best score are right.
    (
        "g7",
        None,
        "3",
        [
            (r"\boxed{4}", 0.125, 0.125, 0.125, None),
            (r"\boxed{4}", 0.125, 0.125, 0.125, None),
            (r"\boxed{3}", 0.875, 0.75, 0.875, None),
        ],
    ),
]

# Worked out by hand from the groups above (g6 skipped).
EXPECTED = {
    "overall": {
        "groups": 6,
        "candidates": 16,
        "errored_candidates": 3,
        "unanswered_candidates": 1,
        "all_errored_groups": 2,
        "correct": {
            "first": 2,  # g1 g3
            "best_score": 1,  # g7
            "best_score_min": 3,  # g1 g2 g7
            "best_score_last": 2,  # g4 g7
            "majority": 3,  # g1 g2 g3
            "weighted_vote": 2,  # g1 g7
            "oracle": 5,  # all but g5
        },
    },
    "a": {"groups": 3, "correct": dict(zip(METHODS, [1, 0, 2, 0, 2, 1, 2], strict=True))},
    "b": {"groups": 2, "correct": dict(zip(METHODS, [1, 0, 0, 1, 1, 0, 2], strict=True))},
    "(null)": {"groups": 1, "correct": dict(zip(METHODS, [0, 1, 1, 1, 0, 1, 1], strict=True))},
}


def _rows():
    rows = []
    for gid, policy, answer, candidates in GROUPS:
        for k, (response, score, smin, slast, error) in enumerate(candidates):
            group_level = response is None
            rows.append(
                {
                    "id": gid,
                    "candidate_index": None if group_level else k,
                    "answer": answer,
                    "policy": policy,
                    "response": response,
                    "num_steps": None if score is None else 2,
                    "step_scores": None if score is None else [smin, slast],
                    "score": score,
                    "score_min": smin,
                    "score_last": slast,
                    "rank": None,
                    "is_best": None,
                    "num_tiles": 1,
                    "num_tokens": 100,
                    "error": error,
                    "error_stage": None if error is None else ("prepare" if group_level else "score"),
                }
            )
    return rows


def write_table(directory, *, shuffle_seed=None, success=True):
    schema = output_schema([pa.field("answer", pa.string()), pa.field("policy", pa.string())])
    rows = _rows()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    directory.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), directory / f"part-{i}.parquet")
    if success:
        (directory / "_SUCCESS").write_text("")
    return directory


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_every_method_matches_the_hand_count(tmp_path, capsys, shuffle_seed):
    table = write_table(tmp_path / "scores", shuffle_seed=shuffle_seed)
    out = tmp_path / "bon.json"
    code = main(
        ["eval-bon", str(table), "--answer-column", "answer", "--group-by", "policy", "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["skipped_groups_without_reference"] == 1
    overall = result["overall"]
    for key, value in EXPECTED["overall"].items():
        assert overall[key] == value, key
    for method, correct in EXPECTED["overall"]["correct"].items():
        assert overall["accuracy"][method] == pytest.approx(correct / 6)
    assert sorted(result["by_group"]) == ["(null)", "a", "b"]
    for name in ("a", "b", "(null)"):
        assert result["by_group"][name]["groups"] == EXPECTED[name]["groups"]
        assert result["by_group"][name]["correct"] == EXPECTED[name]["correct"], name
    printed = capsys.readouterr().out
    assert "oracle" in printed and "83.3%" in printed  # oracle 5/6
    print(printed)


def test_custom_extraction_rule(tmp_path):
    table = write_table(tmp_path / "scores")
    out = tmp_path / "bon.json"
    # Only "Final answer: X" lines count now: g4's c0 (8) and c1 ($7$.) answer, boxed-only ones do not.
    assert main(["eval-bon", str(table), "--extract", r"Final answer: (\S+)", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["extract"] == r"last match of Final answer: (\S+)"
    # g1 c0 "\boxed{12}" and g2 c0 "\boxed{\frac{1}{3}}" are captured raw and do not match the references.
    assert result["overall"]["correct"]["oracle"] == 1  # g4 only, through c1's "$7$."
    assert result["overall"]["correct"]["best_score_last"] == 1


def test_unfinished_or_unusable_tables_are_refused(tmp_path, capsys):
    table = write_table(tmp_path / "scores", success=False)
    assert main(["eval-bon", str(table)]) == 2
    assert "_SUCCESS" in capsys.readouterr().err
    assert main(["eval-bon", str(table), "--allow-incomplete"]) == 0
    assert main(["eval-bon", str(table), "--allow-incomplete", "--answer-column", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval-bon", str(tmp_path / "missing")]) == 2
    assert main(["eval-bon", str(table), "--allow-incomplete", "--extract", "("]) == 2


def test_group_by_must_be_constant_within_a_group(tmp_path, capsys):
    table = write_table(tmp_path / "scores")
    # `response` differs between a group's candidates: not a per-group column.
    assert main(["eval-bon", str(table), "--group-by", "response"]) == 2
    assert "constant within a group" in capsys.readouterr().err


def test_reads_an_output_table_on_s3(s3_env, tmp_path):
    import s3fs

    local = write_table(tmp_path / "scores")
    fs = s3fs.S3FileSystem()
    for path in local.iterdir():
        fs.put(str(path), f"{s3_env}/run/scores/{path.name}")
    out = tmp_path / "bon.json"
    assert main(["eval-bon", f"s3://{s3_env}/run/scores", "--group-by", "policy", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["overall"]["correct"] == EXPECTED["overall"]["correct"]
    fs.rm(f"{s3_env}/run/scores/_SUCCESS")
    assert main(["eval-bon", f"s3://{s3_env}/run/scores"]) == 2  # an unfinished run is refused there too
