"""``visualprm-ray report``: one self-contained HTML page for one finished run.

    data.py   reads the output table and the manifest, computes what the page shows
    plots.py  matplotlib figures (Agg canvas, no pyplot) as PNG bytes
    html.py   the page: inline CSS, plots as data: URIs, every piece of data text escaped

matplotlib is the optional ``report`` extra; it is imported only when a report is made, so the
CLI's ``--help`` and the scoring job never pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visualprm_ray.report.data import ReportError

if TYPE_CHECKING:
    from visualprm_ray.storage import StorageOptions

__all__ = ["DEFAULT_NAME", "ReportError", "build_report", "default_report_uri", "write_report"]

# Leading underscore, like _manifest.json and _SUCCESS: readers of the directory (pandas, pyarrow,
# Spark, this package's list_files) skip it. A plain report.html would make
# `pd.read_parquet("scores/")` fail on a file without Parquet magic bytes.
DEFAULT_NAME = "_report.html"


def default_report_uri(output_uri: str) -> str:
    return f"{output_uri.rstrip('/')}/{DEFAULT_NAME}"


def build_report(output_uri: str, *, options: StorageOptions | None = None, groups: int = 5) -> str:
    """The report page of the run at ``output_uri`` as an HTML string."""
    from visualprm_ray.report.data import group_views, load_run, pick_groups, summarize
    from visualprm_ray.report.html import render
    from visualprm_ray.report.plots import make_plots, require_matplotlib

    # Before reading anything: a missing extra should not cost a scan of the table first.
    require_matplotlib()
    run = load_run(output_uri, options)
    summary = summarize(run)
    scoring = (run.manifest.get("config") or {}).get("scoring") or {}
    threshold = scoring.get("threshold", 0.5)
    plots = make_plots(summary, threshold=threshold)
    low_ids, high_ids = pick_groups(summary, groups)
    return render(
        run,
        summary,
        plots,
        group_views(run, summary, low_ids),
        group_views(run, summary, high_ids),
        threshold=threshold,
    )


def write_report(
    output_uri: str,
    html_uri: str | None = None,
    *,
    options: StorageOptions | None = None,
    groups: int = 5,
) -> str:
    """Write the report to ``html_uri`` (default ``<output_uri>/_report.html``, local or remote).

    Returns where it was written: an absolute path for a local file, else the URI.
    """
    from visualprm_ray.storage import fsspec_filesystem, split_uri

    page = build_report(output_uri, options=options, groups=groups)
    target = html_uri or default_report_uri(output_uri)
    fs, path = fsspec_filesystem(target, options)
    local = split_uri(target)[0] == "file"
    if local:
        # Object stores have no directories; a local parent must exist before the write.
        fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, page.encode("utf-8"))
    return path if local else target
