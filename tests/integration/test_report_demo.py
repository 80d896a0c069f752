"""The report of a real run: the demo's output, as `make demo` leaves it (report.html in the workdir)."""

from __future__ import annotations

import base64
import io
from html import escape
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from visualprm_ray.demo import demo_report
from visualprm_ray.model.prompt import split_steps

pytestmark = pytest.mark.slow


class _Tags(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def plots(self) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img" and "plot" in (a.get("class") or "").split()]


@pytest.fixture(scope="module")
def demo_page(demo_run):
    workdir, manifest = demo_run
    page = workdir / "report.html"  # written by run_demo after its summary
    assert page.is_file()
    return workdir, manifest, page


def test_demo_report_shows_the_run(demo_page):
    workdir, manifest, page = demo_page
    text = page.read_text(encoding="utf-8")
    frame = pd.read_parquet(workdir / "scores")  # still readable as a directory: the report is outside it

    plots = _Tags(text).plots()
    assert len(plots) == 4
    for src in plots:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.width >= 600
    assert "http://" not in text and "https://" not in text

    # The counts agree with the manifest, so no mismatch notice.
    counts = manifest["counts"]
    assert len(frame) == counts["rows_out"] == 96
    assert "rows in the output but the table holds" not in text
    assert manifest["model"]["source"] in text

    # The lowest-scoring group (by its best candidate) is shown first, with its pick's steps as
    # split with the run's max_steps, each text next to its own score.
    best = frame.loc[frame["is_best"]].sort_values(["score", "id"])
    lowest = best.iloc[0]
    first_group = text.index('<details class="group"')
    assert text.index(f">{escape(lowest['id'])}<", first_group) < text.index(
        '<details class="group"', first_group + 1
    )
    # Its card starts with what a person judges a ranking by: the question and the image, the
    # thumbnail the input's own image made small.
    group_html = text[first_group : text.index('<div class="cands">', first_group)]
    assert f'<p class="question">{escape(lowest["question"])}</p>' in group_html
    thumbs = [a["src"] for t, a in _Tags(group_html).tags if t == "img" and "thumb" in (a.get("class") or "")]
    assert len(thumbs) == 1
    source = pd.read_parquet(workdir / "rollouts")
    original = Image.open(io.BytesIO(source.loc[source["id"] == lowest["id"], "image"].iloc[0]))
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1], validate=True))) as thumb:
        assert max(thumb.size) == 160 and thumb.size[0] / thumb.size[1] == pytest.approx(
            original.size[0] / original.size[1], rel=0.02
        )
    steps = split_steps(lowest["response"], manifest["config"]["scoring"]["max_steps"])
    assert len(steps) == lowest["num_steps"]
    for step, score in zip(steps, lowest["step_scores"], strict=True):
        assert f'>{score:.3f}</span><div class="text">{escape(step[:600])}' in text


def test_demo_prints_where_the_report_is(demo_page):
    workdir, _, page = demo_page
    line = demo_report(workdir, str(workdir / "scores"))
    assert line == f"report: {page} (open it in a browser)"


def test_demo_report_renders_in_a_browser(demo_page, headless_chromium):
    _, _, page = demo_page
    result = headless_chromium(page)
    body = next(a for t, a in _Tags(result.dom).tags if t == "body")
    assert body.get("data-plots-ok") == str(len(_Tags(page.read_text()).plots())) == "4", body
    with Image.open(result.screenshot) as shot:
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500
