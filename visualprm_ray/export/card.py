"""The dataset card (README.md) and ``_export.json``: what the dataset is, where it came from, what
was left out and why."""

from __future__ import annotations

import json
from typing import Any

from visualprm_ray.export.formats import format_columns
from visualprm_ray.export.select import REASONS

TRL_TYPE = {
    "dpo": "preference (conversational, with an `images` column)",
    "sft": "prompt-completion (conversational, with an `images` column)",
    "prm": "stepwise supervision (standard, with an `images` column)",
}
TRAINER = {
    "dpo": '`trl.DPOTrainer` (or MPO: DPO with `loss_type=["sigmoid", "bco_pair", "sft"]`)',
    "sft": "`trl.SFTTrainer`",
    "prm": "a process-reward-model trainer reading TRL's stepwise-supervision columns",
}


def render_card(record: dict[str, Any]) -> str:
    """A Hugging Face dataset card: YAML front matter (config, split, features' names) and prose."""
    fmt = record["format"]
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        '    path: "train-*.parquet"',
        "tags:",
        "- visualprm",
        f"- {fmt}",
        "- trl",
        "---",
        "",
        f"# {fmt} data scored by VisualPRM",
        "",
        f"Exported by visualprm-ray {record['version']} from the scores in `{record['scores']}` "
        f"(input `{record['input']}`), scored by `{record['model']['source']}` "
        f"(content digest `{record['model']['identity']}`).",
        "",
        f"TRL dataset type: {TRL_TYPE[fmt]}; for {TRAINER[fmt]}. Load it with "
        '`datasets.load_dataset("parquet", data_dir=...)`: `images` comes back as PIL images.',
        "",
        "## Filters",
        "",
    ]
    filters = record["filters"]
    if fmt == "dpo":
        lines.append(
            f"- one pair per group with at least 2 scored candidates: chosen = the best score, rejected = the "
            f"lowest; best minus lowest >= {filters['min_margin']} (`--min-margin`)"
        )
    elif fmt == "sft":
        floor = filters["min_score"]
        lines.append(
            "- the best-scoring candidate of each group"
            + (f" whose score >= {floor} (`--min-score`)" if floor is not None else " (no score floor)")
        )
    else:
        lines.append(f"- every scored candidate; a step's label is `step_score > {filters['threshold']}`")
    lines += [
        "- candidates the scoring job could not score never appear",
        "",
        "## Counts",
        "",
        "| | |",
        "| --- | --- |",
        f"| groups | {record['groups']} |",
        f"| groups exported | {record['groups_exported']} |",
        f"| rows | {record['rows']} |",
        f"| files | {len(record['files'])} |",
    ]
    for reason, count in record["groups_skipped"].items():
        lines.append(f"| skipped: {reason} ({REASONS[reason]}) | {count} |")
    lines += ["", "## Columns", "", "| column | meaning |", "| --- | --- |"]
    for name, _, meaning in format_columns(fmt):
        lines.append(f"| `{name}` | {meaning} |")
    for name in record["passthrough"]:
        lines.append(f"| `{name}` | Passed through from the scores table. |")
    return "\n".join(lines) + "\n"


def render_record(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, default=str) + "\n"
