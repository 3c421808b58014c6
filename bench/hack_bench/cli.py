"""The `hack-bench` command: a sub-command parser.

To add a sub-command, write a module with `add_arguments(parser)` and `run(args) -> int` and append a
`Subcommand` to `SUBCOMMANDS`.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.hack_bench import compare, experiment, serve, soak
from bench.hack_bench.records import BenchmarkError


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("serve", "benchmark a running OpenAI-compatible server", serve.add_arguments, serve.run),
    Subcommand("compare", "compare saved result files in one table and plot", compare.add_arguments, compare.run),
    Subcommand("experiment", "JCT of fp16 / dequant / hack KV at several link speeds on local clusters",
               experiment.add_arguments, experiment.run),
    Subcommand("soak", "hold a steady load for minutes: errors, p99 latency over time, RSS and fds of every process",
               soak.add_arguments, soak.run),
]


def build_parser(subcommands: Sequence[Subcommand] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hack-bench", description="Load generator for OpenAI-compatible servers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in subcommands if subcommands is not None else SUBCOMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments) and run the chosen sub-command; returns the exit status."""
    # Our own notices at INFO; libraries (httpx logs every request at INFO) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BenchmarkError as exc:
        print(f"hack-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
