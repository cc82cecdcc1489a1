"""What every ``bin/`` entry point shares: a command line built from its stage's settings,
logging, threads, and one clear line and exit status 1 for bad input (exit 3: a training that
checkpointed and stopped, to be resumed)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from comflp.errors import InputError, Stopped
from comflp.settings import add_settings, from_args, str2bool
from comflp.utils import setup_logging

__all__ = ["UsageError", "add_common_args", "main", "positive_int", "run", "str2bool"]


class UsageError(InputError):
    """Bad input to an entry point: printed as one clear error line, exit status 1."""


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_common_args(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    parser.add_argument("--log_file", default=None, help="also append the log here")
    if threads:
        parser.add_argument(
            "--nthreads", type=int, default=0, help="torch CPU threads (0: torch's default)"
        )


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments, set up logging and threads, run ``main``; bad input exits 1 cleanly,
    a bad command line with argparse's status 2 and its error alone on one line (not the
    usage block above it, which buries the line that says what is wrong in a job log)."""

    def one_line(message: str) -> None:
        sys.stderr.write(f"{parser.prog}: error: {message} (--help lists the options)\n")
        raise SystemExit(2)

    parser.error = one_line
    args = parser.parse_args()
    setup_logging(getattr(args, "log_file", None))
    # Denormal floats appear as training goes on and make CPU arithmetic several times slower
    # (measured here: 1 s -> 6 s per step by the second epoch); flush them to zero.
    torch.set_flush_denormal(True)
    if getattr(args, "nthreads", 0):
        torch.set_num_threads(args.nthreads)
    logging.info("command: " + " ".join(sys.argv))
    try:
        main(args)
    except (InputError, FileNotFoundError) as e:
        logging.error(str(e))
        raise SystemExit(1) from None
    except Stopped:
        raise SystemExit(3) from None


def main(settings: type, core: Callable[[Any], None], doc: str | None) -> None:
    """The entry point of one stage: options from ``settings``, then ``core(settings)``."""
    parser = argparse.ArgumentParser(description=doc, allow_abbrev=False)
    add_settings(parser, settings)
    add_common_args(parser, threads="nthreads" not in settings.__dataclass_fields__)

    def call(args: argparse.Namespace) -> None:
        try:
            values = from_args(settings, args)
        except argparse.ArgumentTypeError as e:
            raise UsageError(str(e)) from None
        core(values)

    run(call, parser)
