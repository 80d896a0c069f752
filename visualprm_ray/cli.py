"""The ``visualprm-ray`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
