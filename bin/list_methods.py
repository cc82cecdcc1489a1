#!/usr/bin/env python3
"""Stage 7, step 1: list the layers every method prunes, for each number of pruned layers P.

The searches' choices come from stage 6 (search/<method>_prune<P>/search.json: CoMFLP per
measure, coarse top-1 and fine search; GLP; the oracle); the fixed rules (drop top/bottom,
every other, intermediate-CTC on demand) and random seeds are computed. Writes
compare/methods.json, the list stage 7 decodes, and drops stage 8's list (its rows were made
from the searches this run of stage 7 may have replaced; stage 8 adds them again).
"""

import argparse
import json
import logging
from pathlib import Path

from comflp.adapters import MODEL_TYPES
from comflp.cli import UsageError, add_common_args, parse_num_prune, run
from comflp.expdir import DUMP_INFO, METHODS, METHODS_FINETUNED, ExpDir
from comflp.prune.methods import SEARCH_METHODS, list_methods


def model_depth(exp: ExpDir, model_type: str, model_dir: str) -> int:
    """The number of encoder layers, read from the layer dump of stage 4."""
    info = exp.dump / DUMP_INFO
    if not info.is_file():
        raise FileNotFoundError(
            f"{info}: not found (run stage 4 for {model_type} model {model_dir})"
        )
    return json.loads(info.read_text())["num_layers"]


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    searches = args.search_methods.split()
    unknown = sorted(set(searches) - set(SEARCH_METHODS))
    if unknown:
        raise UsageError(
            f"--search_methods {args.search_methods!r}: unknown {', '.join(unknown)}; "
            f"expected some of {', '.join(SEARCH_METHODS)}"
        )
    model = (args.model_type, str(args.model_dir or args.exp_dir))
    num_layers = model_depth(exp, *model)
    prunes = parse_num_prune(
        args.num_prune, num_layers, f"the {num_layers}-layer model in {model[1]}"
    )
    methods = list_methods(
        exp, model, num_layers, prunes, searches, args.measures.split(), args.random_seeds
    )
    output = exp.compare / METHODS
    methods.save(output)
    (exp.compare / METHODS_FINETUNED).unlink(missing_ok=True)
    logging.info(
        f"{output}: {len(methods.methods)} entries, {len(methods.unique())} distinct models to decode"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--model_type", choices=MODEL_TYPES.names(), default="native")
    parser.add_argument("--model_dir", help="the model pruned (default: --exp_dir)")
    parser.add_argument("--num_prune", required=True, help='space-separated, e.g. "2 4 6"')
    parser.add_argument(
        "--search_methods", default="comflp glp oracle", help="searches run in stage 6"
    )
    parser.add_argument("--measures", default="dc", help="CoMFLP measures searched in stage 6")
    parser.add_argument("--random_seeds", type=int, default=5, help="random selections per P")
    add_common_args(parser)
    run(main, parser)
