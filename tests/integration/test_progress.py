"""The progress counter: counts from the actors, the driver's line, Ray metrics updated."""

from __future__ import annotations

import re

from visualprm_ray.job.progress import ProgressPrinter, ProgressReporter


def test_counts_line_and_queue(ray_local):
    lines: list[str] = []
    with ProgressPrinter("visualprm-progress-test", 3600, total=10, emit=lines.append) as printer:
        reporter = ProgressReporter.connect("visualprm-progress-test")
        reporter.add(groups_prepared=3, prepare_s=0.5)
        reporter.add(scored=7, errored=1, tokens=700, groups_scored=2, score_s=1.5)
        ray_local.get(printer.actor.snapshot.remote())  # the adds above are fire-and-forget
        line = printer.line()
        snap = printer.snapshot()
    assert snap["scored"] == 7 and snap["errored"] == 1 and snap["first_batch"] == 7
    fields = dict(re.findall(r"(\w+)=([\d./]+)", line))
    assert fields["done"] == "8/10" and fields["scored"] == "7" and fields["queue_groups"] == "1"
    assert ProgressReporter.connect("no-such-counter") is None
