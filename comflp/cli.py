"""What every ``bin/`` entry point shares: argument types, logging set-up, clean error exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from comflp.utils import setup_logging


class UsageError(ValueError):
    """Bad input to an entry point: printed as one clear error line, exit status 1."""


def str2bool(value: str) -> bool:
    v = value.lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return name


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_num_prune(text: str | int, num_layers: int, where: str) -> list[int]:
    """The values of ``--num_prune`` (e.g. ``"2 4 6"``), each checked against the model depth."""
    from comflp.prune.subsets import check_num_prune

    try:
        values = [int(p) for p in str(text).split()]
    except ValueError:
        raise UsageError(f'--num_prune {text!r}: expected integers, e.g. "2 4 6"') from None
    if not values:
        raise UsageError("--num_prune: no value given")
    for p in values:
        try:
            check_num_prune(p, num_layers)
        except ValueError:
            raise UsageError(
                f"--num_prune {text}: must be between 1 and {num_layers - 1} for {where}"
            ) from None
    return values


def parse_overrides(items: list[str]) -> dict:
    """``--set SECTION.KEY=VALUE`` options as ``{"SECTION.KEY": value}`` (values read as YAML)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. model.num_layers=6")
        overrides[key] = yaml.safe_load(value)
    return overrides


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """What every training entry point takes: ``--resume``, ``--stop_after_steps``, ``--set``."""
    parser.add_argument(
        "--resume", type=str2bool, default=True, help="continue from the latest checkpoint"
    )
    parser.add_argument(
        "--stop_after_steps",
        type=int,
        default=0,
        help="checkpoint and stop after this many steps in this run (time-sliced jobs)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.num_epochs=2",
    )


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--exp_dir`` and the model it prunes: ``--model_type`` and ``--model_dir``."""
    from comflp.adapters import MODEL_TYPES

    parser.add_argument(
        "--exp_dir", type=Path, required=required, help="experiment directory (stage outputs)"
    )
    parser.add_argument("--model_type", choices=MODEL_TYPES.names(), default="native")
    parser.add_argument(
        "--model_dir", type=Path, help="the model to prune (default: --exp_dir, a comflp model)"
    )
    parser.add_argument("--device", default="auto")


def load_model_args(args: argparse.Namespace):
    """The :class:`PrunableModel` of :func:`add_model_args`' options, on ``--device``."""
    from comflp.adapters import load_prunable

    model_dir = args.model_dir or args.exp_dir
    try:
        model = load_prunable(args.model_type, model_dir)
    except ValueError as e:
        raise UsageError(f"--model_dir {model_dir}: {e}") from None
    return model.to(resolve_device(args.device))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log_file", default=None, help="also append the log here")
    parser.add_argument(
        "--nthreads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments, set up logging and threads, run ``main``; known errors exit 1 cleanly."""
    args = parser.parse_args()
    setup_logging(getattr(args, "log_file", None))
    # Denormal floats appear as training goes on and make CPU arithmetic several times slower
    # (measured here: 1 s -> 6 s per step by the second epoch); flush them to zero.
    torch.set_flush_denormal(True)
    if getattr(args, "nthreads", 0):
        torch.set_num_threads(args.nthreads)
    logging.info("command: " + " ".join(sys.argv))
    from comflp.asr.config import ConfigError
    from comflp.corpus.prepare import CorpusError

    try:
        main(args)
    except (UsageError, ConfigError, CorpusError, FileNotFoundError) as e:
        logging.error(str(e))
        raise SystemExit(1) from None
