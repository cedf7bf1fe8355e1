"""`python -m mpc <command>`: the command line.

Each command lives beside the code it drives; a module joins the CLI by defining
`register_cli(subparsers)` that adds its parser and sets `func` (called with the parsed
args, returning an exit code). User errors print one line and exit non-zero; no
traceback unless MPC_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mpc.errors import UserError

# Commands and the modules that define them, in the order `--help` lists them.
COMMANDS = {
    "main": "mpc.main",                 # the README's main job
    "synth": "mpc.data.synth",
    "prepare-criteo": "mpc.data.prepare",
    "train": "mpc.train",
    "memory": "mpc.memory",
    "bench": "mpc.bench",
    "reproduce": "mpc.reproduce",
}


def _wanted_modules(argv: list[str]) -> list[str]:
    """Only the named command's module (importing all of them pulls in torch, sklearn...)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in COMMANDS:
        return [COMMANDS[first]]
    return list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _wanted_modules(sys.argv[1:] if argv is None else argv):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet
                continue
            raise
        module.register_cli(sub)
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _sigterm_as_interrupt(signum, frame):
    # Turn `kill` into KeyboardInterrupt so that atomic writers remove their temp files.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("bench", "train", "main"):
        # training and benchmarks (all contenders alike) under the same malloc settings
        from mpc.cpu_settings import tune_cpu

        tune_cpu()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if os.environ.get("MPC_DEBUG"):
            raise
        print(f"mpc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mpc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
