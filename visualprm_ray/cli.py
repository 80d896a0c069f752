"""The ``visualprm-ray`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _score(args: argparse.Namespace) -> int:
    from visualprm_ray.config import ConfigError, JobConfig
    from visualprm_ray.pipeline import run_job

    try:
        config = JobConfig.from_sources(
            args.config, args.set, input_uri=args.input, output_uri=args.output, model_source=args.model
        )
    except ConfigError as exc:
        print(f"visualprm-ray: bad configuration: {exc}", file=sys.stderr)
        return 2
    run_job(config)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from visualprm_ray.demo import run_demo

    run_demo(args.workdir)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from visualprm_ray.schema import render_schema_table

    print(render_schema_table())
    return 0


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    from visualprm_ray.checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.dir, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a tiny random VisualPRM checkpoint (upstream layout) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visualprm-ray",
        description="Score multimodal reasoning rollouts with the VisualPRM-8B process reward model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score",
        help="run the scoring job: Parquet rollouts in, one scored row per candidate out",
        description="Run the scoring job on Ray (RAY_ADDRESS or runtime.ray_address, else a local Ray). "
        "Precedence: --config YAML < --input/--output/--model < --set.",
    )
    score.add_argument("--input", help="input Parquet file, directory/prefix or glob (local, s3://, gs://)")
    score.add_argument("--output", help="output directory/prefix")
    score.add_argument("--model", help="checkpoint: local directory, s3:// prefix or hub id")
    score.add_argument("--config", help="job config YAML (see jobs/configs/)")
    score.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set scoring.token_budget=32768 (repeatable)",
    )
    score.set_defaults(func=_score)

    demo = commands.add_parser(
        "demo", help="sample data + tiny checkpoint + the full Ray pipeline on this machine, then a summary"
    )
    demo.add_argument(
        "--workdir", default="visualprm-demo", help="where to write everything (default ./visualprm-demo)"
    )
    demo.set_defaults(func=_demo)

    schema = commands.add_parser("schema", help="print the output schema as a table")
    schema.set_defaults(func=_schema)

    tiny = commands.add_parser(
        "tiny-checkpoint", help="write a tiny random checkpoint in the upstream layout (tests, demos)"
    )
    tiny.add_argument("dir", help="directory to write")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.add_argument(
        "--tokenizer",
        choices=["sentencepiece", "tokenizers"],
        default="sentencepiece",
        help="write tokenizer.model (the release's form) or tokenizer.json",
    )
    tiny.set_defaults(func=_tiny_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
