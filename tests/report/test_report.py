"""`visualprm-ray report` on a synthetic output table written in the real output schema.

The table holds every case the page must survive: errors at each stage (candidate- and
group-level), a group with a single scored candidate (no margin), a null score without an error,
responses not stored, responses that do not split into the scored number of steps, a long response
whose steps are merged (max_steps), and a response holding markup.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visualprm_ray.cli import main
from visualprm_ray.model.prompt import split_steps
from visualprm_ray.report import DEFAULT_NAME, ReportError, build_report, write_report
from visualprm_ray.report.data import error_kind, group_views, load_run, pick_groups, summarize
from visualprm_ray.schema import output_schema

PASSTHROUGH = [
    pa.field("policy", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("image", pa.binary()),
]
EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
LONG = "\n\n".join(f"piece {i}" for i in range(14))  # 14 pieces, max_steps 12 -> 7 steps of 2 pieces

# (id, candidate_index, policy, response, step_scores, error); error as "kind: detail", stage separately.
SPEC = [
    ("g-a", 0, "policy-a", "Step A1\n\nStep A2\n\nFinal answer: 5", [0.9, 0.8, 0.95], None),
    ("g-a", 1, "policy-a", f"Bad start {EVIL}\n\nFinal answer: 7", [0.2, 0.1], None),
    ("g-a", 2, "policy-b", "One step only", [0.6], None),  # per-candidate policy (flat layout)
    ("g-b", 0, "policy-b", "x\n\ny", [0.3, 0.4], None),
    ("g-b", 1, "policy-b", "z", None, ("prepare", "image_undecodable: cannot identify image file")),
    ("g-c", None, "policy-b", None, None, ("prepare", "no_candidates: the group's response list is empty")),
    ("g-d", 0, "policy-b", None, [0.7, 0.75], None),  # response not stored
    ("g-d", 1, "policy-b", None, [0.1], None),
    ("g-e", 0, "policy-a", "a\n\nb\n\nc", [0.5, 0.55], None),  # pre-split steps: 3 pieces, 2 scores
    ("g-e", 1, "policy-a", "one\n\ntwo", [0.45, 0.4], None),
    ("g-f", 0, "policy-a", LONG, [0.6] * 7, None),
    ("g-f", 1, "policy-a", "too long", None, ("score", "context_length: 40000 tokens > 32768")),
    ("g-g", 0, "policy-a", "no score, no error", None, None),  # never written by the job; survived
    ("g-g", 1, "policy-a", "fine", [0.33], None),
]


def _rows(spec) -> dict[str, list]:
    """Output rows with score, score_min/last, rank and is_best derived as the job derives them."""
    schema = output_schema(PASSTHROUGH)
    data: dict[str, list] = {name: [] for name in schema.names}
    ranks: dict[tuple, int] = {}
    groups: dict[str, list] = {}
    for gid, k, _, _, steps, _ in spec:
        if steps is not None:
            groups.setdefault(gid, []).append((-sum(steps) / len(steps), k))
    for gid, members in groups.items():
        for rank, (_, k) in enumerate(sorted(members)):
            ranks[gid, k] = rank
    for gid, k, policy, response, steps, error in spec:
        row = dict.fromkeys(schema.names)
        row |= {"id": gid, "candidate_index": k, "policy": policy, "answer": "5", "image": b"\x89PNG"}
        row["response"] = response
        if steps is not None:
            row |= {
                "num_steps": len(steps),
                "step_scores": steps,
                "score": sum(steps) / len(steps),
                "score_min": min(steps),
                "score_last": steps[-1],
                "rank": ranks[gid, k],
                "num_tiles": 3,
                "num_tokens": 900,
            }
        row["is_best"] = ranks.get((gid, k)) == 0
        if error is not None:
            row["error_stage"], row["error"] = error
            if "error_kind" in schema.names:
                row["error_kind"] = error_kind(error[1])
        for name in schema.names:
            data[name].append(row[name])
    return data


def _manifest(rows: int, scored: int, errored: int) -> dict:
    return {
        "status": "complete",
        "config": {
            "scoring": {"max_steps": 12, "threshold": 0.5},
            "output": {"uri": "/somewhere", "include_response": True},
            "storage": {"endpoint_url": None},
        },
        "model": {"source": "/models/VisualPRM-8B", "identity": "sha256:" + "ab" * 32},
        "layout": "flat",
        "input": {"fingerprint": "sha256:00", "files": ["/in/part-0.parquet", "/in/part-1.parquet"]},
        "resources": {"device": "cuda", "num_scorers": 8, "num_preparers": 16},
        "counts": {
            "groups_in": 7,
            "candidates_in": rows,
            "rows_out": rows,
            "scored": scored,
            "errored": errored,
        },
        "timings": {
            "started": 1.7e9,
            "finished": 1.7e9 + 120,
            "elapsed_s": 120.0,
            "rows_per_s": scored / 120,
            "steady_rows_per_s": 1.5,
            "tokens_scored": 12600,
            "tokens_per_s": 105.0,
            "first_result_s": 30.0,
            "stage_busy_s": {"prepare": 3.0, "score": 9.0},
        },
        "versions": {"visualprm-ray": "0.1.0", "pyarrow": pa.__version__},
    }


def write_output(out: Path, spec=SPEC, *, files: int = 2) -> Path:
    """A finished run: Parquet files, _manifest.json, _SUCCESS."""
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(_rows(spec), schema=output_schema(PASSTHROUGH)) if spec else None
    if table is not None:
        step = -(-len(table) // files)
        for i in range(files):
            pq.write_table(table.slice(i * step, step), out / f"part-{i}.parquet")
    scored = sum(1 for s in spec if s[4] is not None and s[5] is None)
    errored = sum(1 for s in spec if s[5] is not None)
    (out / "_manifest.json").write_text(json.dumps(_manifest(len(spec), scored, errored)))
    (out / "_SUCCESS").write_text("")
    return out


@pytest.fixture
def output(tmp_path) -> Path:
    return write_output(tmp_path / "scores")


class _Page(HTMLParser):
    """Tags, attributes, section ids, plot sources and visible text of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def plots(self) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img" and "plot" in (a.get("class") or "").split()]

    def ids(self, tag: str) -> set[str]:
        return {a["id"] for t, a in self.tags if t == tag and a.get("id")}


# ------------------------------------------------------------------------------------------ the data


def test_summary_counts_errors_margins_and_step_positions(output):
    summary = summarize(load_run(str(output)))
    scored = [s for s in SPEC if s[4] is not None and s[5] is None]
    assert (summary.rows, summary.groups) == (len(SPEC), 7)
    assert (summary.scored, summary.errored, summary.unscored) == (len(scored), 3, 1)
    assert dict(summary.by_stage) == {"prepare": 2, "score": 1}
    assert {k.kind: k.count for k in summary.by_kind} == {
        "image_undecodable": 1,
        "no_candidates": 1,
        "context_length": 1,
    }
    assert sorted(summary.scores.tolist()) == pytest.approx(sorted(sum(s[4]) / len(s[4]) for s in scored))

    # Margins: best minus runner-up per group with two scored candidates or more.
    by_group: dict[str, list[float]] = {}
    for gid, _, _, _, steps, _ in scored:
        by_group.setdefault(gid, []).append(sum(steps) / len(steps))
    expected = {g: sorted(v)[-1] - sorted(v)[-2] for g, v in by_group.items() if len(v) >= 2}
    got = dict(zip(summary.margin_ids, summary.margins.tolist(), strict=True))
    assert got == pytest.approx(expected, abs=1e-6)
    assert set(got) == {"g-a", "g-d", "g-e"}
    assert summary.single_candidate_groups == 3  # g-b, g-f, g-g

    # Step i of every scored candidate lands at position i + 1.
    positions: dict[int, list[float]] = {}
    for *_, steps, _ in scored:
        for i, value in enumerate(steps, 1):
            positions.setdefault(i, []).append(value)
    for position, values in positions.items():
        assert sorted(summary.step_values[summary.step_positions == position].tolist()) == pytest.approx(
            sorted(values), abs=1e-6
        )
    assert len(summary.step_values) == sum(len(s[4]) for s in scored)


def test_group_views_pair_step_texts_with_scores(output):
    run = load_run(str(output))
    summary = summarize(run)
    low, high = pick_groups(summary, 2)
    assert low == ["g-g", "g-b"] and high == ["g-a", "g-d"]
    views = {g.id: g for g in group_views(run, summary, summary.group_ids)}

    a = views["g-a"]
    assert [c.candidate_index for c in a.candidates] == [0, 2, 1]  # rank order
    assert a.candidates[0].is_best and not any(c.is_best for c in a.candidates[1:])
    assert ("answer", "5") in a.fields and "policy" not in dict(a.fields)  # policy differs per candidate
    assert dict(a.candidates[1].fields)["policy"] == "policy-b"
    assert a.candidates[2].steps[0][0] == f"Bad start {EVIL}"  # raw in the data, escaped in the page
    assert a.margin == pytest.approx((0.9 + 0.8 + 0.95) / 3 - 0.6, abs=1e-6)

    f = views["g-f"].candidates[0]  # merged like the job merged them: 14 pieces -> 7 steps
    assert [t for t, _ in f.steps] == split_steps(LONG, 12) and len(f.steps) == 7
    assert f.steps[0][0] == "piece 0\n\npiece 1" and f.steps_note is None
    assert views["g-f"].candidates[1].error.startswith("context_length")
    assert views["g-f"].margin is None

    e = views["g-e"].candidates[0]
    assert [t for t, _ in e.steps] == [None, None] and "splits into 3 steps but 2" in e.steps_note
    d = views["g-d"].candidates[0]
    assert [s for _, s in d.steps] == pytest.approx([0.7, 0.75]) and "not stored" in d.steps_note


def test_error_kind_is_the_text_before_the_first_colon():
    assert error_kind("image_missing: s3://b/k: no such key") == "image_missing"
    assert error_kind("no colon at all") == "no colon at all"


# ------------------------------------------------------------------------------------------ the page


def test_page_is_self_contained_escaped_and_complete(output):
    where = write_report(str(output))
    assert where == str(output / DEFAULT_NAME)
    text = Path(where).read_text(encoding="utf-8")
    page = _Page(text)

    plots = page.plots()
    assert len(plots) == 4  # scores, step positions, score vs steps, margins
    for src in plots:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
        with Image.open(io.BytesIO(png)) as image:
            assert image.width >= 600 and image.height >= 300
    assert {"summary", "errors", "scores", "groups", "run"} <= page.ids("section")

    # Nothing to fetch: no external scripts, styles, images or links.
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value)
        assert tag != "link"
    assert "http://" not in text and "https://" not in text
    assert text.count("<script") == 1  # the plot check, inline

    # A policy model's markup is shown as text, never executed or rendered.
    assert EVIL not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
    assert "Bad start &lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in text
    visible = "".join(page.text)
    assert f"Bad start {EVIL}" in visible

    for kind in ("image_undecodable", "no_candidates", "context_length"):
        assert kind in visible
    assert "splits into 3 steps but 2 were scored" in visible
    assert "response not stored" in visible
    assert "1 row(s) have neither a score" in visible
    assert "/models/VisualPRM-8B" in visible and "steady" in visible


def test_the_default_name_leaves_the_table_readable_as_a_directory(output):
    import pandas as pd

    write_report(str(output))
    # A report.html here would break pd.read_parquet("scores/") (no Parquet magic bytes).
    assert len(pd.read_parquet(output)) == len(SPEC)


@pytest.mark.parametrize(
    ("case", "plots", "says"),
    [
        ("all_errored", 0, "No candidate was scored"),
        ("zero_rows", 0, "The output table holds no rows"),
        ("single_candidates", 3, "No group has two scored candidates"),
    ],
)
def test_edge_cases_render(tmp_path, case, plots, says):
    spec = {
        "all_errored": [s for s in SPEC if s[5] is not None],
        "zero_rows": [],
        "single_candidates": [("s-1", 0, "p", "a\n\nb", [0.2, 0.3], None), ("s-2", 0, "p", "c", [0.9], None)],
    }[case]
    out = write_output(tmp_path / case, spec)
    page = _Page(build_report(str(out)))
    assert len(page.plots()) == plots
    assert says in "".join(page.text)
    assert {"summary", "errors", "scores", "groups", "run"} <= page.ids("section")


def test_browser_renders_every_plot(output, headless_chromium):
    target = output.parent / "page.html"
    write_report(str(output), str(target))
    expected = len(_Page(target.read_text()).plots())
    result = headless_chromium(target)
    body = next(a for t, a in _Page(result.dom).tags if t == "body")
    assert body.get("data-plots-ok") == str(expected) == "4", body
    with Image.open(result.screenshot) as shot:
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # a blank or broken page has a handful


# --------------------------------------------------------------------------------- failures, storage


def test_no_run_there_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    with pytest.raises(ReportError, match=r"_manifest\.json is missing"):
        build_report(str(tmp_path / "half"))
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(output, monkeypatch, capsys):
    from visualprm_ray.demo import demo_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ReportError, match=r"pip install 'visualprm-ray\[report\]'"):
        build_report(str(output))
    assert main(["report", str(output)]) == 2
    assert "pip install 'visualprm-ray[report]'" in capsys.readouterr().err
    assert not (output / DEFAULT_NAME).exists()
    line = demo_report(output.parent, str(output))
    assert line.startswith("report: skipped") and "visualprm-ray[report]" in line


def test_cli_writes_where_asked(output, tmp_path, capsys):
    target = tmp_path / "pages" / "run.html"
    assert main(["report", str(output), "--html", str(target), "--groups", "1"]) == 0
    assert f"report: {target} (open it in a browser)" in capsys.readouterr().out
    text = target.read_text()
    assert text.count('<details class="group"') == 2  # one lowest, one highest


def test_cli_help_does_not_import_matplotlib():
    code = "import sys; from visualprm_ray.cli import build_parser; build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_s3_output_and_report(output, s3_env):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(output) + "/", f"{s3_env}/run/", recursive=True)
    assert fs.exists(f"{s3_env}/run/_SUCCESS")
    where = write_report(f"s3://{s3_env}/run")
    assert where == f"s3://{s3_env}/run/{DEFAULT_NAME}"
    fs.invalidate_cache()
    page = _Page(fs.cat_file(f"{s3_env}/run/{DEFAULT_NAME}").decode())
    assert len(page.plots()) == 4
    assert "context_length" in "".join(page.text)


def test_truncated_candidates_pair_the_scored_steps(tmp_path):
    if "truncated" not in output_schema().names:
        pytest.skip("this output schema has no truncated column")
    spec = [("t-1", 0, "p", "a\n\nb\n\nc", [0.4, 0.5], None), ("t-1", 1, "p", "d", [0.2], None)]
    out = write_output(tmp_path / "scores", spec)
    table = pq.read_table(out / "part-0.parquet")
    flags = [row["candidate_index"] == 0 for row in table.select(["candidate_index"]).to_pylist()]
    pq.write_table(
        table.set_column(table.schema.get_field_index("truncated"), "truncated", pa.array(flags)),
        out / "part-0.parquet",
    )

    run = load_run(str(out))
    summary = summarize(run)
    assert summary.truncated == 1
    (view,) = group_views(run, summary, ["t-1"])
    cut = view.candidates[0]
    assert cut.truncated and cut.steps == [("a", pytest.approx(0.4)), ("b", pytest.approx(0.5)), ("c", None)]
    assert "first 2 of 3 steps" in cut.steps_note
    assert "were truncated" in "".join(_Page(build_report(str(out))).text)
