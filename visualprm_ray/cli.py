"""The ``visualprm-ray`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _score(args: argparse.Namespace) -> int:
    from visualprm_ray.job.config import ConfigError, JobConfig
    from visualprm_ray.job.counts import RunVerdictError
    from visualprm_ray.job.driver import ActorStartError, JobCheckError, run_job
    from visualprm_ray.job.inputs import InputSchemaError
    from visualprm_ray.job.preflight import SetupError
    from visualprm_ray.job.resume import ResumeConflict

    overrides = [*args.set, *(["output.mode=overwrite"] if args.fresh else [])]
    try:
        config = JobConfig.from_sources(
            args.config, overrides, input_uri=args.input, output_uri=args.output, model_source=args.model
        )
    except ConfigError as exc:
        print(f"visualprm-ray: bad configuration: {exc}", file=sys.stderr)
        return 2
    # What the user can fix gets one line and an exit status; --debug adds the traceback. Anything
    # else is a bug of ours and keeps its traceback.
    status = {
        SetupError: 2,
        ResumeConflict: 2,
        InputSchemaError: 2,
        FileExistsError: 2,  # output.mode: error and an output that holds files
        ActorStartError: 1,
        JobCheckError: 3,  # the manifest says what is wrong; no _SUCCESS, so readers never take it
        RunVerdictError: 4,  # complete and consistent, but nearly every row errored; no _SUCCESS
    }
    try:
        run_job(config)
    except tuple(status) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"visualprm-ray: {exc}", file=sys.stderr)
        return next(code for kind, code in status.items() if isinstance(exc, kind))
    return 0


def _config(args: argparse.Namespace) -> int:
    from visualprm_ray.job.config import render_fields

    sys.stdout.write(render_fields(args.format))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from visualprm_ray.demo import run_demo

    run_demo(args.workdir)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from visualprm_ray.schema import render_schema_table

    print(render_schema_table())
    return 0


def _report(args: argparse.Namespace) -> int:
    from visualprm_ray.report import ReportError, write_report

    try:
        where = write_report(args.output, args.html, groups=args.groups)
    except ReportError as exc:
        print(f"visualprm-ray report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {where} (open it in a browser)")
    return 0


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.dir, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a tiny random VisualPRM checkpoint (upstream layout) to {path}")
    return 0


def _eval_vpb(args: argparse.Namespace) -> int:
    from visualprm_ray.evaluate import EvalInputError
    from visualprm_ray.evaluate.metrics import threshold_grid
    from visualprm_ray.evaluate.vpb import run_eval_vpb

    try:
        start, stop, step = (float(x) for x in args.sweep.split(":"))
        grid = threshold_grid(start, stop, step)
    except ValueError:
        print(f"visualprm-ray: bad --sweep {args.sweep!r}; expected START:STOP:STEP", file=sys.stderr)
        return 2
    try:
        run_eval_vpb(
            output=args.output,
            data=args.data,
            image_root=args.image_root,
            model=args.model,
            scores=args.scores,
            threshold=args.threshold,
            grid=grid,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
        )
    except EvalInputError as exc:
        print(f"visualprm-ray eval-vpb: {exc}", file=sys.stderr)
        return 2
    return 0


def _eval_bon(args: argparse.Namespace) -> int:
    from visualprm_ray.evaluate import EvalInputError
    from visualprm_ray.evaluate.bon import run_eval_bon

    try:
        run_eval_bon(
            args.output,
            answer_column=args.answer_column,
            response_column=args.response_column,
            group_by=args.group_by,
            extract=args.extract,
            json_path=args.json,
            allow_incomplete=args.allow_incomplete,
        )
    except EvalInputError as exc:
        print(f"visualprm-ray eval-bon: {exc}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from visualprm_ray.export import ExportConfig, ExportError, run_export
    from visualprm_ray.job.config import ConfigError
    from visualprm_ray.storage import StorageError

    try:
        config = ExportConfig.from_sources(
            args.config,
            args.set,
            scores_uri=args.scores,
            scores_allow_incomplete=True if args.allow_incomplete else None,
            input_uri=args.input,
            export_format=args.format,
            export_min_margin=args.min_margin,
            export_min_score=args.min_score,
            export_threshold=args.threshold,
            output_uri=args.to,
        )
    except ConfigError as exc:
        print(f"visualprm-ray export: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        run_export(config)
    except (ExportError, FileNotFoundError, StorageError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"visualprm-ray export: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from visualprm_ray.job.config import ConfigError
    from visualprm_ray.serve.config import ServeConfig
    from visualprm_ray.serve.driver import ServeSetupError, run_serve

    try:
        config = ServeConfig.from_sources(
            args.config,
            args.set,
            model_source=args.model,
            server_host=args.host,
            server_port=args.port,
            server_replicas=args.replicas,
        )
    except ConfigError as exc:
        print(f"visualprm-ray serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        run_serve(config)
    except ServeSetupError as exc:
        print(f"visualprm-ray serve: {exc}", file=sys.stderr)
        return 2
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
        "Precedence: --config YAML < --input/--output/--model < --set. A rerun of a killed job resumes "
        "where it stopped. Exit status: 0 done, 1 the actors could not start, 2 bad configuration, input, "
        "output, model or storage (found before Ray starts) or a resume of a different job, 3 the output "
        "failed the count check (rows lost or doubled), 4 nearly every candidate errored "
        "(runtime.max_errored_fraction).",
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
    score.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove this job's earlier output instead of resuming it (output.mode=overwrite)",
    )
    score.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    score.set_defaults(func=_score)

    config = commands.add_parser(
        "config",
        help="print every config field with its default and description",
        description="Every field of the job config (section.key), generated from the config models: its "
        "type, default and description. --format yaml writes a commented starting config.",
    )
    config.add_argument(
        "--format", choices=["table", "yaml"], default="table", help="table (default) or yaml"
    )
    config.set_defaults(func=_config)

    demo = commands.add_parser(
        "demo", help="sample data + tiny checkpoint + the full Ray pipeline on this machine, then a summary"
    )
    demo.add_argument(
        "--workdir", default="visualprm-demo", help="where to write everything (default ./visualprm-demo)"
    )
    demo.set_defaults(func=_demo)

    schema = commands.add_parser("schema", help="print the output schema as a table")
    schema.set_defaults(func=_schema)

    report = commands.add_parser(
        "report",
        help="one self-contained HTML page for a finished run: counts, errors, score plots, groups",
        description="Write an HTML report of a finished run (plots embedded, no network needed to view it). "
        "Needs matplotlib: pip install 'visualprm-ray[report]'.",
    )
    report.add_argument("output", metavar="OUTPUT_URI", help="the scoring job's output (local or s3://...)")
    report.add_argument(
        "--html",
        metavar="FILE",
        help="where to write the page, a path or URI (default OUTPUT_URI/_report.html, next to the manifest)",
    )
    report.add_argument(
        "--groups",
        type=int,
        default=5,
        metavar="N",
        help="lowest- and highest-scoring groups shown in full (default 5 each)",
    )
    report.set_defaults(func=_report)

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

    vpb = commands.add_parser(
        "eval-vpb",
        help="VisualProcessBench: score the labelled steps as given, report macro F1",
        description="Score every sample's given steps (no re-splitting) and report step macro F1 per data "
        "source and overall (micro, step-weighted and plain mean over sources), at --threshold and over "
        "--sweep. Writes step_scores.parquet and metrics.json to --output.",
    )
    vpb.add_argument("--data", help="the benchmark's JSON-lines file (local or s3://...)")
    vpb.add_argument("--image-root", help="directory the 'image' paths are relative to (default: --data's)")
    source = vpb.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint: local directory, s3:// prefix or hub id")
    source.add_argument("--scores", help="recompute the metrics from an earlier step_scores.parquet")
    vpb.add_argument("--output", help="directory for step_scores.parquet and metrics.json")
    vpb.add_argument(
        "--threshold", type=float, default=0.5, help="a step is predicted correct when score > this (0.5)"
    )
    vpb.add_argument("--sweep", default="0.05:0.95:0.05", help="thresholds START:STOP:STEP (0.05:0.95:0.05)")
    vpb.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    vpb.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="auto: bfloat16 on cuda, float32 on cpu",
    )
    vpb.add_argument("--limit", type=int, help="score only the first N samples (a quick look)")
    vpb.set_defaults(func=_eval_vpb)

    bon = commands.add_parser(
        "eval-bon",
        help="best-of-N accuracy of a scoring job's output table",
        description="Accuracy of candidate 0, of the best candidate by score / score_min / score_last, of "
        "majority and score-weighted voting, and the oracle, overall and per --group-by value.",
    )
    bon.add_argument("output", metavar="OUTPUT_URI", help="the scoring job's output (local or s3://...)")
    bon.add_argument("--answer-column", default="answer", help="column of the reference answer (answer)")
    bon.add_argument("--response-column", default="response", help="column holding the response text")
    bon.add_argument("--group-by", help="also report per value of this column (e.g. policy)")
    bon.add_argument(
        "--extract",
        metavar="REGEX",
        help="answer = last match of REGEX (its group 1 if any); default: last \\boxed{...}, else a "
        "'Final answer:' line",
    )
    bon.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bon.add_argument(
        "--allow-incomplete", action="store_true", help="read an output that has no _SUCCESS marker yet"
    )
    bon.set_defaults(func=_eval_bon)

    export = commands.add_parser(
        "export",
        help="turn a finished scores output into training data: dpo pairs, sft sets or prm step labels",
        description="Join a scores output back to its input (images included, on Ray) and write a Hugging "
        "Face datasets Parquet dataset in TRL's form: dpo (preference: best vs lowest score), sft "
        "(prompt-completion: the best candidate) or prm (stepwise supervision: steps and step labels). "
        "Writes README.md (the dataset card), _export.json (counts, and groups left out by reason) and "
        "_SUCCESS. Precedence: --config YAML < the flags < --set. Exit status: 0 done, 2 a scores output "
        "without _SUCCESS, a changed input, an output that holds files or a bad configuration.",
    )
    export.add_argument("scores", metavar="SCORES_URI", help="the scoring job's output (local, s3://, gs://)")
    export.add_argument("--format", choices=["dpo", "sft", "prm"], help="the training-data format")
    export.add_argument("--to", metavar="OUT_URI", help="where to write the dataset")
    export.add_argument("--input", help="the rollouts the scores were made from (default: the manifest's)")
    export.add_argument("--min-margin", type=float, help="dpo: best minus lowest score at least this (0)")
    export.add_argument("--min-score", type=float, help="sft: the best score at least this (no floor)")
    export.add_argument(
        "--threshold",
        type=float,
        help="prm: a step's label is step_score > this (the job's scoring.threshold)",
    )
    export.add_argument(
        "--allow-incomplete", action="store_true", help="read a scores output that has no _SUCCESS marker"
    )
    export.add_argument(
        "--config", help="export config YAML (sections scores, input, export, output, runtime, storage)"
    )
    export.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)"
    )
    export.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    export.set_defaults(func=_export)

    serve = commands.add_parser(
        "serve",
        help="serve the PRM over HTTP (Ray Serve) for RL loops: POST /v1/score, same scores as the job",
        description="Deploy the PRM as a Ray Serve application: one model replica per GPU (or a CPU replica), "
        "requests of concurrent clients coalesced into scorer batches. Attaches to $RAY_ADDRESS like the "
        "job, else starts a local Ray. Every request needs the bearer token of $VISUALPRM_SERVE_TOKEN (or "
        "server.token_file). Precedence: --config YAML < the flags < --set. Exit status: 2 for a bad "
        "configuration or no token.",
    )
    serve.add_argument("--model", help="the checkpoint: a local directory, s3:// or gs:// prefix, or hub id")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--replicas", type=int, help="model replicas (default: one per GPU, else one)")
    serve.add_argument(
        "--config", help="server config YAML (sections model, images, scoring, server, storage)"
    )
    serve.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)"
    )
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
