"""``visualprm-ray demo``: sample rollouts, a tiny checkpoint and the full Ray job on this machine.

Everything is generated locally (diagram images drawn with Pillow, geometry questions, several
candidates of mixed lengths each, a random checkpoint in the upstream layout), so the demo runs
without network or GPU; the scores are meaningless, the pipeline is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_GROUPS = 24
DEMO_CANDIDATES = 4
DEMO_SHARDS = 3


def demo_config(workdir: Path):
    from visualprm_ray.job.config import JobConfig

    return JobConfig.from_dict(
        {
            "input": {"uri": str(workdir / "rollouts")},
            "model": {"source": str(workdir / "tiny-visualprm"), "dtype": "float32"},
            "output": {"uri": str(workdir / "scores"), "mode": "overwrite"},
            "runtime": {"cpus_per_preparer": 0.5, "progress_interval_s": 10},
        }
    )


def write_demo_inputs(workdir: Path) -> None:
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint
    from visualprm_ray.sample_data import make_groups, write_shards

    groups = make_groups(DEMO_GROUPS, candidates=DEMO_CANDIDATES, seed=0)
    write_shards(workdir / "rollouts", groups, DEMO_SHARDS)
    write_tiny_checkpoint(workdir / "tiny-visualprm", seed=0)


def summarize(output_uri: str, manifest: dict[str, Any], *, picks: int = 3) -> str:
    """A short, readable summary of a finished run's output table."""
    import duckdb

    counts, timings = manifest["counts"], manifest["timings"]
    lines = [
        "",
        f"rows in: {counts['candidates_in']} candidates in {counts['groups_in']} groups",
        f"scored: {counts['scored']}, errored: {counts['errored']}, rows written: {counts['rows_out']}",
        f"throughput: {timings['rows_per_s']:.2f} rows/s over {timings['elapsed_s']:.1f} s (start-up included)",
        "",
        "best-of-N picks (step scores of the chosen candidate):",
    ]
    table = f"read_parquet('{output_uri.rstrip('/')}/*.parquet')"
    rows = (
        duckdb.connect()
        .execute(
            f"select id, candidate_index, score, step_scores, response from {table} "
            f"where is_best order by id limit {int(picks)}"
        )
        .fetchall()
    )
    for gid, idx, score, steps, response in rows:
        first = (response or "").split("\n\n")[-1][:70]
        lines.append(f"  {gid}: candidate {idx}, score {score:.3f}, steps {[round(s, 3) for s in steps]}")
        lines.append(f"      ends with: {first!r}")
    lines += ["", f"table: {output_uri} (Parquet; open it with pandas, polars or DuckDB)"]
    return "\n".join(lines)


def demo_report(workdir: Path, output_uri: str) -> str:
    """Write the run's HTML report next to the demo's data; the line that points at it."""
    import importlib.util

    from visualprm_ray.report.plots import INSTALL_HINT

    # The report is an extra: without matplotlib the demo still succeeds and says how to get it.
    if importlib.util.find_spec("matplotlib") is None:
        return (
            f"report: skipped, it needs matplotlib ({INSTALL_HINT}), then: visualprm-ray report {output_uri}"
        )
    from visualprm_ray.report import write_report

    path = write_report(output_uri, str(workdir / "report.html"))
    return f"report: {path} (open it in a browser)"


def run_demo(workdir: str | Path, *, emit=print) -> dict[str, Any]:
    from visualprm_ray.job.driver import run_job

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    emit(f"[visualprm-ray] demo in {workdir}: writing sample rollouts and a tiny checkpoint")
    write_demo_inputs(workdir)
    config = demo_config(workdir)
    manifest = run_job(config, emit=emit)
    emit(summarize(config.output.uri, manifest))
    emit(demo_report(workdir, config.output.uri))
    return manifest
