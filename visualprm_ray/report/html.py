"""The report page: one self-contained HTML file (inline CSS, plots as data: URIs, no network).

Every piece of text that comes from the data (ids, responses, passthrough values, error messages,
config values, paths) goes through :func:`_e`: responses are written by policy models and may hold
anything, markup included.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visualprm_ray.report.data import CandidateView, GroupView, Run, Summary
    from visualprm_ray.report.plots import Plot

STEP_PREVIEW = 600  # characters of a step shown before the rest folds away

# Red -> yellow -> green, as in ColorBrewer's RdYlGn: a step score is a probability, 0.5 is the middle.
_STOPS = [
    (0.0, (215, 48, 39)),
    (0.25, (252, 141, 89)),
    (0.5, (254, 224, 139)),
    (0.75, (145, 207, 96)),
    (1.0, (26, 152, 80)),
]

# Sets data-plots-ok on <body> to the number of plots the browser decoded in full, so a headless
# browser (the tests) can tell a rendered page from one with broken images. The plots are opaque (white
# background): a truncated PNG still reports its size but leaves its last rows transparent.
_CHECK_SCRIPT = """
function drawnInFull(img) {
  if (!img.complete || img.naturalWidth === 0) return false;
  try {
    var canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    var g = canvas.getContext("2d");
    g.drawImage(img, 0, 0);
    var row = g.getImageData(0, img.naturalHeight - 1, img.naturalWidth, 1).data;
    for (var i = 3; i < row.length; i += 4) if (row[i] !== 255) return false;
    return true;
  } catch (e) {
    return false;
  }
}
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("img.plot"), ok = 0;
  for (var i = 0; i < plots.length; i++) if (drawnInFull(plots[i])) ok++;
  document.body.setAttribute("data-plots-ok", String(ok));
});
"""

_CSS = """
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f6f7f9; --card: #fff;
        --blue: #3567a8; --orange: #e07b39; --red: #b42318; --amber: #b54708; --green: #067647; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1e2a3b; color: #fff; padding: 22px 0 16px; }
.wrap { max-width: 1240px; margin: 0 auto; padding: 0 24px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header .sub { color: #cbd5e1; font-size: 13px; word-break: break-all; }
header .sub code { color: #fff; }
nav { margin-top: 12px; display: flex; gap: 18px; font-size: 13px; }
nav a { color: #cbd5e1; text-decoration: none; }
nav a:hover { color: #fff; }
main { padding: 8px 0 48px; }
section { margin-top: 28px; }
h2 { font-size: 17px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 8px; color: #374151; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
        vertical-align: middle; margin-left: 8px; }
.pill.ok { background: #d1fadf; color: var(--green); }
.pill.warn { background: #fef0c7; color: var(--amber); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card .detail { color: var(--muted); font-size: 12px; }
.card.bad .value { color: var(--red); }
.notice { background: #fffaeb; border: 1px solid #fedf89; color: #7a2e0e; border-radius: 8px;
          padding: 10px 14px; margin-top: 12px; }
.empty { color: var(--muted); font-style: italic; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 16px; align-items: start; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line);
        border-radius: 8px; overflow: hidden; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f9fafb; font-weight: 600; font-size: 12.5px; color: #374151; }
tr:last-child td { border-bottom: 0; }
table.narrow { max-width: 760px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.msg { word-break: break-word; }
td code { white-space: nowrap; }
.cols.errs { grid-template-columns: minmax(280px, 1fr) minmax(440px, 2fr); }
table.kv td:first-child { color: var(--muted); width: 40%; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
figure h3 { margin: 0 0 6px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 6px; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; margin: 4px 0 12px; }
.legend .bar { width: 200px; height: 10px; border-radius: 3px;
               background: linear-gradient(to right, rgb(215,48,39), rgb(252,141,89), rgb(254,224,139),
                                           rgb(145,207,96), rgb(26,152,80)); }
details.group { background: var(--card); border: 1px solid var(--line); border-radius: 8px; margin-bottom: 12px; }
.group-head { padding: 8px 14px; display: flex; gap: 12px; align-items: flex-start; flex-wrap: wrap; }
.group-head img.thumb { max-width: 160px; max-height: 160px; border: 1px solid var(--line); border-radius: 4px; }
.group-head .question { margin: 0; flex: 1 1 320px; white-space: pre-wrap; }
details.group > summary { cursor: pointer; padding: 10px 14px; display: flex; flex-wrap: wrap; gap: 6px 14px;
                          align-items: center; list-style: none; }
details.group > summary::-webkit-details-marker { display: none; }
details.group[open] > summary { border-bottom: 1px solid var(--line); }
.gid { font-weight: 600; }
.tag { color: var(--muted); font-size: 12.5px; }
.tag b { color: var(--fg); font-weight: 600; }
.strip { display: inline-flex; gap: 2px; vertical-align: middle; }
.strip i { display: inline-block; width: 9px; height: 14px; border-radius: 2px; }
.cands { padding: 8px 14px 12px; }
.cand { border-left: 3px solid var(--line); padding: 6px 0 6px 12px; margin: 8px 0; }
.cand.best { border-left-color: var(--orange); }
.cand.err { border-left-color: var(--red); }
.cand-head { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; font-size: 13px; }
.badge { font-size: 11px; font-weight: 600; padding: 0 7px; border-radius: 999px; }
.badge.best { background: #fdead7; color: #93370d; }
.badge.err { background: #fee4e2; color: var(--red); }
.badge.warn { background: #fef0c7; color: var(--amber); }
ol.steps { list-style: none; margin: 6px 0 0; padding: 0; }
ol.steps li { display: flex; gap: 10px; padding: 3px 0; align-items: flex-start; }
.chip { flex: 0 0 auto; min-width: 54px; text-align: center; font-size: 12px; font-weight: 600; border-radius: 4px;
        padding: 1px 6px; font-variant-numeric: tabular-nums; }
.step-no { flex: 0 0 22px; color: var(--muted); font-size: 12px; text-align: right; padding-top: 1px; }
.text { white-space: pre-wrap; word-break: break-word; font-size: 13px; min-width: 0; }
.text details summary { color: var(--blue); cursor: pointer; font-size: 12px; }
.note { color: var(--muted); font-size: 12px; margin: 4px 0 0; }
.errmsg { color: var(--red); font-size: 12.5px; white-space: pre-wrap; word-break: break-word; margin-top: 4px; }
details.raw summary { cursor: pointer; color: var(--blue); margin: 10px 0 6px; }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow: auto;
      max-height: 520px; margin: 0; }
footer { color: var(--muted); font-size: 12px; padding: 24px 0; }
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _score_colour(score: float) -> tuple[str, str]:
    """Background and text colour for a step score in [0, 1]."""
    s = min(max(float(score), 0.0), 1.0)
    for (x0, c0), (x1, c1) in itertools.pairwise(_STOPS):
        if s <= x1:
            t = (s - x0) / (x1 - x0)
            rgb = tuple(round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True))
            break
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return f"rgb{rgb}", "#fff" if luminance < 140 else "#1f2937"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _table(
    headers: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = ""
) -> str:
    """``rows`` hold HTML already escaped by the caller; no ``headers``, no header row."""
    head = "".join(
        f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(headers or [])
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f'<td class="msg">{c}</td>'
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _card(label: str, value: str, detail: str = "", *, bad: bool = False) -> str:
    cls = "card bad" if bad else "card"
    detail_html = f'<div class="detail">{detail}</div>' if detail else ""
    return f'<div class="{cls}"><div class="label">{label}</div><div class="value">{value}</div>{detail_html}</div>'


def _rows_key(counts: dict[str, Any]) -> str:
    # rows_total counts the whole output (earlier attempts of a resumed run included); manifests
    # written before it existed only have rows_out.
    return "rows_total" if "rows_total" in counts else "rows_out"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


# ------------------------------------------------------------------------------------------ sections


def _summary_section(run: Run, summary: Summary) -> str:
    import numpy as np

    timings = run.manifest.get("timings") or {}
    rate = timings.get("rows_per_s")
    steady = timings.get("steady_rows_per_s")
    cards = [
        _card("Rows", _fmt(summary.rows), f"{_fmt(summary.groups)} groups"),
        _card("Scored", _fmt(summary.scored), _pct(summary.scored, summary.rows)),
        _card("Errored", _fmt(summary.errored), _pct(summary.errored, summary.rows), bad=summary.errored > 0),
    ]
    if len(summary.scores):
        cards += [
            _card(
                "Mean score",
                _fmt(float(summary.scores.mean())),
                f"median {float(np.median(summary.scores)):.3f}",
            ),
            _card("Best-of-N mean", _fmt(float(summary.best_scores.mean())), "score of each group's pick"),
        ]
    if len(summary.margins):
        cards.append(_card("Median margin", _fmt(float(np.median(summary.margins))), "best minus runner-up"))
    cards.append(
        _card(
            "Rows / s",
            f"{rate:,.2f}" if isinstance(rate, (int, float)) else "–",
            f"steady {steady:,.2f} (after start-up)" if isinstance(steady, (int, float)) else "whole run",
        )
    )
    elapsed = timings.get("elapsed_s")
    cards.append(
        _card(
            "Elapsed", f"{elapsed:,.1f} s" if isinstance(elapsed, (int, float)) else "–", "start-up included"
        )
    )

    notices = []
    if not run.complete:
        notices.append(
            "No <code>_SUCCESS</code> marker: the run may not have finished; the numbers may be partial."
        )
    counts = run.manifest.get("counts") or {}
    expected = counts.get(_rows_key(counts))
    if expected is not None and expected != summary.rows:
        notices.append(
            f"The manifest counts {_fmt(expected)} rows in the output but the table holds "
            f"{_fmt(summary.rows)}: files were added or removed after the run."
        )
    if summary.truncated:
        notices.append(
            f"{_fmt(summary.truncated)} scored candidate(s) were truncated: only their leading steps fit the "
            "model's context (<code>scoring.context_policy: truncate</code>)."
        )
    if summary.unscored:
        notices.append(f"{_fmt(summary.unscored)} row(s) have neither a score (null or NaN) nor an error.")
    if not summary.rows:
        notices.append("The output table holds no rows.")
    elif not summary.scored:
        notices.append("No candidate was scored: every row is an error (see below).")
    notice_html = "".join(f'<div class="notice">{n}</div>' for n in notices)
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>{notice_html}</section>'


def _errors_section(summary: Summary) -> str:
    if not summary.errored:
        what = "No errors: every candidate was scored." if summary.rows else "No rows."
        return f'<section id="errors"><h2>Errors</h2><p class="empty">{what}</p></section>'
    stages = _table(
        ["stage", "rows", "share of rows"],
        [[f"<code>{_e(s)}</code>", _fmt(n), _pct(n, summary.rows)] for s, n in summary.by_stage],
        numeric={1, 2},
    )
    kinds = _table(
        ["kind", "stage", "rows", "example"],
        [
            [
                f"<code>{_e(k.kind)}</code>",
                _e(", ".join(k.stages)),
                _fmt(k.count),
                _e(k.example if len(k.example) <= 300 else k.example[:299] + "…"),
            ]
            for k in summary.by_kind
        ],
        numeric={2},
    )
    kind_source = (
        "The kind is the <code>error_kind</code> column."
        if summary.typed_kinds
        else "The kind is the text before the first <code>:</code> of <code>error</code>."
    )
    return (
        '<section id="errors"><h2>Errors</h2>'
        f"<p>{_fmt(summary.errored)} of {_fmt(summary.rows)} rows ({_pct(summary.errored, summary.rows)}) were not "
        f"scored. {kind_source}</p>"
        f'<div class="cols errs"><div><h3>By stage</h3>{stages}</div><div><h3>By kind</h3>{kinds}</div></div></section>'
    )


def _plots_section(summary: Summary, plots: list[Plot], threshold: float | None) -> str:
    import numpy as np

    if not plots:
        return '<section id="scores"><h2>Scores</h2><p class="empty">No scored candidates: nothing to plot.</p></section>'
    figures = "".join(
        f'<figure id="plot-{_e(p.key)}"><h3>{_e(p.title)}</h3>'
        f'<img class="plot" alt="{_e(p.title)}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
        f"<figcaption>{_e(p.caption)}</figcaption></figure>"
        for p in plots
    )
    scores, steps = summary.scores, summary.step_values
    q = np.quantile(scores, [0.1, 0.5, 0.9]) if len(scores) else [None] * 3
    rows = [
        ["candidate score", _fmt(float(scores.mean())), *(_fmt(float(v)) for v in q), _fmt(len(scores))],
    ]
    if len(steps):
        qs = np.quantile(steps, [0.1, 0.5, 0.9])
        rows.append(
            ["step score", _fmt(float(steps.mean())), *(_fmt(float(v)) for v in qs), _fmt(len(steps))]
        )
    stats = _table(["", "mean", "p10", "median", "p90", "n"], rows, numeric={1, 2, 3, 4, 5}, cls="narrow")
    below = ""
    if threshold is not None and len(steps):
        share = float((steps < threshold).mean())
        below = (
            f'<p class="note">{100 * share:.1f}% of the steps score below the step threshold {threshold:g} '
            "(<code>scoring.threshold</code>).</p>"
        )
    if not len(summary.margins):
        below += (
            '<p class="note">No group has two scored candidates or more: no best-of-N margins to plot.</p>'
        )
    return f'<section id="scores"><h2>Scores</h2><div class="plots">{figures}</div><h3>In numbers</h3>{stats}{below}</section>'


def _strip(candidate: CandidateView) -> str:
    cells = []
    for _, score in candidate.steps:
        if score is None:
            continue
        bg, _fg = _score_colour(score)
        cells.append(f'<i style="background:{bg}" title="{score:.3f}"></i>')
    return f'<span class="strip">{"".join(cells)}</span>'


def _step_text(text: str) -> str:
    if len(text) <= STEP_PREVIEW:
        return _e(text)
    rest = len(text) - STEP_PREVIEW
    return (
        f"{_e(text[:STEP_PREVIEW])}<details><summary>… {rest:,} more characters</summary>"
        f"{_e(text[STEP_PREVIEW:])}</details>"
    )


def _candidate(c: CandidateView) -> str:
    cls = "cand best" if c.is_best else ("cand err" if c.error else "cand")
    head = [f"<span><b>#{c.rank + 1}</b></span>" if c.rank is not None else ""]
    head.append(f'<span class="tag">candidate <b>{_fmt(c.candidate_index)}</b></span>')
    if c.score is not None:
        head.append(f'<span class="tag">score <b>{c.score:.3f}</b></span>')
        n = sum(score is not None for _, score in c.steps)
        head.append(f'<span class="tag">{n} step{"s" if n != 1 else ""}</span>')
    if c.truncated:
        head.append('<span class="badge warn">truncated</span>')
    if c.is_best:
        head.append('<span class="badge best">best-of-N pick</span>')
    if c.error:
        head.append(f'<span class="badge err">error · {_e(c.error_stage or "?")}</span>')
    head += [f'<span class="tag">{_e(n)}: <b>{_e(v)}</b></span>' for n, v in c.fields]
    parts = [f'<div class="{cls}"><div class="cand-head">{"".join(head)}</div>']
    if c.error:
        parts.append(f'<div class="errmsg">{_e(c.error)}</div>')
    if c.steps:
        items = []
        for i, (text, score) in enumerate(c.steps, 1):
            if score is None:
                chip = '<span class="chip" style="background:#e5e7eb" title="not scored">–</span>'
            else:
                bg, fg = _score_colour(score)
                chip = f'<span class="chip" style="background:{bg};color:{fg}">{score:.3f}</span>'
            body = _step_text(text) if text is not None else ""
            items.append(f'<li><span class="step-no">{i}</span>{chip}<div class="text">{body}</div></li>')
        parts.append(f'<ol class="steps">{"".join(items)}</ol>')
    if not c.steps and not c.error:
        parts.append('<p class="note">no score and no error</p>')
    if c.steps_note:
        parts.append(f'<p class="note">{_e(c.steps_note)}</p>')
    parts.append("</div>")
    return "".join(parts)


def _group(g: GroupView) -> str:
    best = next((c for c in g.candidates if c.is_best), None)
    summary = [
        f'<span class="gid mono">{_e(g.id)}</span>',
        f'<span class="tag">best <b>{g.best:.3f}</b></span>',
        f'<span class="tag">margin <b>{g.margin:.3f}</b></span>'
        if g.margin is not None
        else '<span class="tag">margin <b>–</b> (one scored candidate)</span>',
        f'<span class="tag">{len(g.candidates)} candidate{"s" if len(g.candidates) != 1 else ""}</span>',
    ]
    summary += [f'<span class="tag">{_e(n)}: <b>{_e(v)}</b></span>' for n, v in g.fields]
    if best is not None:
        summary.append(_strip(best))
    candidates = "".join(_candidate(c) for c in g.candidates)
    # What a person looks at first when judging a ranking: the question and the image(s).
    head = "".join(
        f'<img class="thumb" src="{src}" alt="image {k + 1} of {_e(g.id)}">'
        for k, src in enumerate(g.thumbnails)
    )
    if g.image_note:
        head += f'<p class="note">{_e(g.image_note)}</p>'
    if g.question:
        head += f'<p class="question">{_e(g.question)}</p>'
    head = f'<div class="group-head">{head}</div>' if head else ""
    return f'<details class="group" open><summary>{"".join(summary)}</summary>{head}<div class="cands">{candidates}</div></details>'


def _groups_section(low: list[GroupView], high: list[GroupView]) -> str:
    if not low and not high:
        return '<section id="groups"><h2>Groups</h2><p class="empty">No group has a scored candidate.</p></section>'
    legend = (
        '<div class="legend">step score <span>0</span><span class="bar"></span><span>1</span>'
        "· candidates in rank order, the best-of-N pick marked in orange</div>"
    )
    parts = ['<section id="groups"><h2>Groups</h2>', legend]
    parts.append(f"<h3>Lowest-scoring groups (by their best candidate): {len(low)}</h3>")
    parts += [_group(g) for g in low]
    if high:
        parts.append(f"<h3>Highest-scoring groups: {len(high)}</h3>")
        parts += [_group(g) for g in high]
    parts.append("</section>")
    return "".join(parts)


def _run_section(run: Run, summary: Summary) -> str:
    m = run.manifest
    model = m.get("model") or {}
    timings = m.get("timings") or {}
    counts = m.get("counts") or {}
    resources = m.get("resources") or {}
    versions = m.get("versions") or {}
    busy = timings.get("stage_busy_s") or {}

    def kv(rows: list[tuple[str, Any]]) -> str:
        return _table(None, [[_e(k), v if isinstance(v, str) else _fmt(v, 2)] for k, v in rows], cls="kv")

    def num(v: Any, unit: str = "") -> str:
        return f"{v:,.2f}{unit}" if isinstance(v, (int, float)) else "–"

    fingerprint = str(model.get("identity") or "–")
    run_rows = [
        ("model", f"<code>{_e(model.get('source', '–'))}</code>"),
        ("model identity", f'<code title="{_e(fingerprint)}">{_e(fingerprint[:23])}</code>'),
        ("status", _e(m.get("status", "–"))),
        ("layout", _e(m.get("layout", "–"))),
        (
            "input files",
            _fmt((m.get("input") or {}).get("file_count", len((m.get("input") or {}).get("files") or []))),
        ),
        ("output files", _fmt(len(run.files))),
        ("started", _when(timings.get("started"))),
        ("finished", _when(timings.get("finished"))),
        (
            "device",
            _e(
                f"{resources.get('num_scorers', '?')} scorer(s) on {resources.get('device', '?')}, "
                f"{resources.get('num_preparers', '?')} preparer(s)"
            ),
        ),
    ]
    timing_rows = [
        ("elapsed", num(timings.get("elapsed_s"), " s")),
        ("rows / s (whole run)", num(timings.get("rows_per_s"))),
        ("rows / s (steady)", num(timings.get("steady_rows_per_s"))),
        ("tokens scored", _fmt(timings.get("tokens_scored"))),
        ("tokens / s", num(timings.get("tokens_per_s"))),
        ("first result after", num(timings.get("first_result_s"), " s")),
        ("busy: prepare / score", f"{num(busy.get('prepare'), ' s')} / {num(busy.get('score'), ' s')}"),
    ]
    # Every scalar count the manifest has (its set grows with the pipeline), next to what this
    # table says where the two measure the same thing.
    mine = {"groups_in": summary.groups, _rows_key(counts): summary.rows}
    mine |= {"scored": summary.scored, "errored": summary.errored}
    count_rows = [
        [_e(key.replace("_", " ")), _fmt(value), _fmt(mine[key]) if key in mine else ""]
        for key, value in counts.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    counts_html = _table(["", "manifest", "this table"], count_rows, numeric={1, 2})
    version_html = " · ".join(f"{_e(k)} <code>{_e(v)}</code>" for k, v in versions.items())
    input_files = (m.get("input") or {}).get("files") or []
    files = "\n".join(str(f) for f in input_files)
    return (
        '<section id="run"><h2>Run</h2><div class="cols">'
        f"<div><h3>Model and layout</h3>{kv(run_rows)}</div>"
        f"<div><h3>Throughput</h3>{kv(timing_rows)}<h3>Counts</h3>{counts_html}</div></div>"
        f'<p class="note">{version_html}</p>'
        f'<details class="raw"><summary>Resolved config</summary><pre>{_e(json.dumps(m.get("config"), indent=2, default=str))}</pre></details>'
        f'<details class="raw"><summary>Input files ({len(input_files)})</summary><pre>{_e(files)}</pre></details>'
        f'<details class="raw"><summary>Full manifest</summary><pre>{_e(json.dumps(m, indent=2, default=str))}</pre></details>'
        "</section>"
    )


# -------------------------------------------------------------------------------------------- page


def render(
    run: Run,
    summary: Summary,
    plots: list[Plot],
    low: list[GroupView],
    high: list[GroupView],
    *,
    threshold: float | None,
) -> str:
    from visualprm_ray.storage import redact

    uri = redact(run.uri)
    status = (
        '<span class="pill ok">complete</span>'
        if run.complete
        else '<span class="pill warn">no _SUCCESS</span>'
    )
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    finished = _when((run.manifest.get("timings") or {}).get("finished"))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>VisualPRM scores · {_e(uri)}</title>
<style>{_CSS}</style>
<script>{_CHECK_SCRIPT}</script>
</head>
<body data-plots="{len(plots)}">
<header><div class="wrap">
<h1>VisualPRM scores {status}</h1>
<div class="sub"><code>{_e(uri)}</code> · finished {finished}</div>
<nav><a href="#summary">Summary</a><a href="#errors">Errors</a><a href="#scores">Scores</a>
<a href="#groups">Groups</a><a href="#run">Run</a></nav>
</div></header>
<main><div class="wrap">
{_summary_section(run, summary)}
{_errors_section(summary)}
{_plots_section(summary, plots, threshold)}
{_groups_section(low, high)}
{_run_section(run, summary)}
<footer>Made by <code>visualprm-ray report</code> on {generated}. Self-contained: no network needed to view it.</footer>
</div></main>
</body>
</html>
"""
