#!/usr/bin/env python3
"""Stage 4, step 2: join the layer dumps of a job array's parts into dump/ of --exp_dir."""

import argparse
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import ExpDir
from comflp.prune.dump import merge_dumps


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    parts = [exp.dump_part(j) for j in range(1, args.num_parts + 1)]
    try:
        merge_dumps(parts, exp.dump)
    except ValueError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="holds dump/parts/1 .. N")
    parser.add_argument("--num_parts", type=int, default=1)
    add_common_args(parser)
    run(main, parser)
