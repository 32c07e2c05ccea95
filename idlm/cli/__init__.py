"""The `idlm` command. Each command is a module with `add_parsers(sub)`, which adds its parser(s)
and sets `run` to the function that carries it out; options several commands share are in
options.py. A new command is a new module listed in COMMANDS."""

import argparse
import os
import sys

from idlm import __version__
from idlm.cli import bench, cache, distill, evaluate, generate, serve, train

COMMANDS = (generate, train, distill, serve, evaluate, bench, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models: "
                                     "decode, serve and convert. Runs offline on the embedded default model.")
    parser.add_argument("--version", action="version", version=f"idlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parsers(sub)
    remember_parsers(parser)
    return parser


def remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's parser records itself in the parsed arguments as `parser`, so that an
    unknown option is reported with the usage of the command it was given to."""
    parser.set_defaults(parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command_parser in action.choices.values():
                remember_parsers(command_parser)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "overrides"):  # only commands that take free --key value pairs have it
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    if extra:
        args.overrides = extra
    try:
        args.run(args)
    except ValueError as e:
        print(f"idlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
