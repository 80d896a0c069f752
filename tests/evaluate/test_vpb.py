"""VisualProcessBench end to end: a small benchmark file in the real format, with figures drawn by
Pillow, scored by a tiny checkpoint through the real command; the reported F1 is recomputed by hand
from the per-step scores file and the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from visualprm_ray.cli import main
from visualprm_ray.evaluate.metrics import threshold_grid
from visualprm_ray.evaluate.vpb import STEP_SCHEMA, Sample, score_samples
from visualprm_ray.model.prm import ScoredResponse


def _sample(
    source, images, steps, labels, question="What is the value of x in the figure?", policy="policy-a"
):
    return {
        "image": images,
        "question": question,
        "answer": "3",
        "response": {"steps": steps, "process_correctness": labels},
        "policy_model": policy,
        "data_source": source,
    }


LONG = [f"Step {i}: the angle is {10 * i} degrees." for i in range(15)]  # more than max_steps=12
LINES = [
    json.dumps(
        _sample("MathVision", ["figures/a.png"], ["The line is a diagonal.", "So x = 4.", ""], [1, -1, 0])
    ),
    json.dumps(
        _sample("MathVision", ["figures/a.png", "figures/b.png"], ["Both show lines.", "x = 3."], [1, 1])
    ),
    json.dumps(_sample("DynaMath", [], LONG, [1] * 9 + [-1, 0, -1, -1, 1, -1], policy="policy-b")),
    "",  # blank lines are skipped and do not count as samples
    json.dumps(_sample("DynaMath", ["figures/b.png"], ["A", "B", "C", "D"], [-1, -1, 1, 0])),
    json.dumps(_sample("WeMath", ["figures/missing.png"], ["A", "B"], [1, -1])),  # error: no such image
    json.dumps(_sample("WeMath", ["figures/a.png"], ["A", "B", "C"], [1, -1])),  # error: 3 steps, 2 labels
    '{"question": "not JSON',  # error: unreadable line
    json.dumps(_sample("MMMU", ["figures/a.png"], ["First.", "Second.", "Third.", "Fourth."], [1, 1, -1, 1])),
    json.dumps(_sample("MMMU", ["figures/b.png"], ["Only neutral.", "Still neutral."], [0, 0])),
    json.dumps({**_sample(None, [], ["x is 3.", "Done."], [1, -1]), "data_source": None}),
]
SAMPLES = [json.loads(line) if line.startswith('{"image"') else line for line in LINES if line]
ERRORED = {4: "image not found", 5: "3 steps but 2", 6: "not valid JSON"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("vpb-model"), seed=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vpb-bench")
    (root / "figures").mkdir()
    a = Image.new("RGB", (448, 448), "white")
    ImageDraw.Draw(a).line([(20, 420), (420, 20)], fill="black", width=4)
    a.save(root / "figures" / "a.png")
    b = Image.new("RGB", (900, 300), "white")  # a wide figure: several tiles
    ImageDraw.Draw(b).polygon([(50, 250), (850, 250), (450, 40)], outline="blue", width=3)
    b.save(root / "figures" / "b.png")
    (root / "bench.jsonl").write_text("\n".join(LINES) + "\n")
    return root


@pytest.fixture(scope="module")
def run(model, bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("vpb-out")
    # the image root is given explicitly, and the command runs from elsewhere
    args = ["eval-vpb", "--data", str(bench / "bench.jsonl"), "--image-root", str(bench)]
    code = main([*args, "--model", str(model), "--output", str(out), "--device", "cpu"])
    assert code == 0
    return out


def _steps(out: Path) -> list[dict]:
    return pq.read_table(out / "step_scores.parquet").to_pylist()


def test_steps_are_scored_as_given_one_score_each(run, capsys):
    table = pq.read_table(run / "step_scores.parquet")
    assert table.schema == STEP_SCHEMA
    rows = table.to_pylist()
    for index, sample in enumerate(SAMPLES):
        mine = [r for r in rows if r["sample_index"] == index]
        if index in ERRORED:
            assert len(mine) == 1 and ERRORED[index] in mine[0]["error"]
            assert mine[0]["step_index"] is None and mine[0]["score"] is None
            continue
        labels = sample["response"]["process_correctness"]
        assert [r["step_index"] for r in mine] == list(range(len(labels)))  # 15 for the long one: no merging
        assert [r["label"] for r in mine] == labels
        assert all(0.0 <= r["score"] <= 1.0 and r["error"] is None for r in mine)
        assert {r["data_source"] for r in mine} == {sample["data_source"]}
        assert {r["policy_model"] for r in mine} == {sample["policy_model"]}


def test_scores_are_the_scorer_s_own(run, model, bench):
    from visualprm_ray.model.prm import VisualPRM

    prm = VisualPRM.from_pretrained(model, device="cpu", dtype="float32")
    sample = SAMPLES[7]
    (result,) = prm.score(
        sample["question"],
        [sample["response"]["steps"]],
        images=[bench / "figures" / "a.png"],
        max_steps=None,
    )
    written = [r["score"] for r in _steps(run) if r["sample_index"] == 7]
    assert written == pytest.approx(result.step_scores, abs=1e-6)


def test_reported_f1_matches_a_hand_count_of_the_scores_file(run, macro_f1_by_hand):
    report = json.loads((run / "metrics.json").read_text())
    rows = [r for r in _steps(run) if r["error"] is None]
    by_source: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        by_source.setdefault(r["data_source"] or "(unknown)", []).append((r["label"], r["score"]))
    assert sorted(report["per_source"]) == ["(unknown)", "DynaMath", "MMMU", "MathVision"]

    def by_hand(threshold):
        per_source = {
            s: macro_f1_by_hand(*zip(*pairs, strict=True), threshold) for s, pairs in by_source.items()
        }
        every = [p for pairs in by_source.values() for p in pairs]
        micro = macro_f1_by_hand(*zip(*every, strict=True), threshold)
        labelled = {s: sum(label != 0 for label, _ in pairs) for s, pairs in by_source.items()}
        defined = [s for s, f in per_source.items() if f is not None]
        weighted = sum(per_source[s] * labelled[s] for s in defined) / sum(labelled[s] for s in defined)
        mean = sum(per_source[s] for s in defined) / len(defined)
        return per_source, {"micro": micro, "weighted": weighted, "mean": mean}

    per_source, overall = by_hand(0.5)
    assert per_source["MMMU"] is not None  # its all-neutral sample adds nothing, the other one counts
    for source, f1 in per_source.items():
        assert report["per_source"][source]["macro_f1"] == pytest.approx(f1)
    for pooling, f1 in overall.items():
        assert report["overall"][pooling] == pytest.approx(f1)
    assert [p["threshold"] for p in report["sweep"]] == threshold_grid()
    for point in report["sweep"]:
        per_source, overall = by_hand(point["threshold"])
        assert point["overall"] == pytest.approx(overall)
        assert point["per_source"] == pytest.approx(per_source)
    best_micro = max(p["overall"]["micro"] for p in report["sweep"])
    first_best = next(p["threshold"] for p in report["sweep"] if p["overall"]["micro"] == best_micro)
    assert report["best"]["micro"] == {"threshold": first_best, "macro_f1": pytest.approx(best_micro)}

    labels = [r["label"] for r in rows]
    assert report["counts"] == {
        "samples": 10,
        "scored_samples": 7,
        "errored_samples": 3,
        "steps": sum(label != 0 for label in labels),
        "correct": labels.count(1),
        "incorrect": labels.count(-1),
        "neutral": labels.count(0),
    }
    assert [e["sample_index"] for e in report["errors"]] == sorted(ERRORED)
    assert report["errors"][0]["data_source"] == "WeMath"


def test_scores_flag_recomputes_the_same_metrics_without_the_model(run, tmp_path, capsys):
    capsys.readouterr()
    code = main(["eval-vpb", "--scores", str(run / "step_scores.parquet"), "--output", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall (micro)" in printed and "best at" in printed
    print(printed)
    first = json.loads((run / "metrics.json").read_text())
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert first.pop("inputs")["dtype"] == "float32"
    assert again.pop("inputs") == {"scores": str(run / "step_scores.parquet")}
    assert again == first
    # Another threshold changes the numbers at the threshold, not the sweep.
    assert main(["eval-vpb", "--scores", str(run / "step_scores.parquet"), "--threshold", "0.05"]) == 0


class _DroppingPRM:
    """Scores one step too few: what a step-merging bug would look like."""

    max_pixels = None

    def score(self, question, responses, images=None, max_steps=12, *, on_error="raise"):
        (steps,) = responses
        return [ScoredResponse(steps, steps[:-1], [0.5] * (len(steps) - 1), 0.5)]


def test_misaligned_scores_are_a_loud_bug():
    sample = Sample(0, "q", [], ["a", "b", "c"], [1, -1, 0], "MMMU", "p")
    with pytest.raises(RuntimeError, match="3 steps given but 2 scores"):
        score_samples(_DroppingPRM(), [sample], None, emit=lambda _: None)


def test_bad_arguments_exit_2(tmp_path, bench, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval-vpb", "--data", str(bench / "bench.jsonl")])  # neither --model nor --scores
    assert exc.value.code == 2
    assert main(["eval-vpb", "--model", "m", "--output", str(tmp_path)]) == 2  # --model needs --data
    assert main(["eval-vpb", "--scores", str(tmp_path / "none.parquet")]) == 2
    assert main(["eval-vpb", "--scores", "x.parquet", "--sweep", "0.1:0.5"]) == 2
    assert "--sweep" in capsys.readouterr().err


def test_a_corrupt_scores_file_is_refused(run, tmp_path, capsys):
    table = pq.read_table(run / "step_scores.parquet")
    labels = table.column("label").to_pylist()
    first_scored = next(i for i, e in enumerate(table.column("error").to_pylist()) if e is None)
    labels[first_scored] = 2
    bad = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int8()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    assert main(["eval-vpb", "--scores", str(tmp_path / "bad.parquet")]) == 2
    assert "other than 1, -1, 0" in capsys.readouterr().err
    pq.write_table(table.drop_columns(["score"]), tmp_path / "no-score.parquet")
    assert main(["eval-vpb", "--scores", str(tmp_path / "no-score.parquet")]) == 2
