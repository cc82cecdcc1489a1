#!/usr/bin/env python3
"""Stage 7, step 2 (and 8): decode a set with every distinct pruned model of a method list.

Each (model, pruned layers) pair is decoded once: the layers are removed physically (the
model's own ``prune``) and the set is decoded with --decoding_method. With --num_parts N, only
part --part of the utterances is decoded (for job arrays); bin/results.py merges the parts.
Writes compare/decode/<set>/<model key>/part<J>.json of --exp_dir: per-utterance ref/hyp,
decoding time, audio duration. With --model_dir instead of --exp_dir, decodes that one model
(after removing --prune_layers) into --output_dir/<model key>/.
"""

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from comflp.adapters import MODEL_TYPES, load_prunable
from comflp.asr.data import eval_loader, load_cuts, part_of
from comflp.cli import UsageError, add_common_args, resolve_device, run
from comflp.decoding import decode_set
from comflp.expdir import DECODE_PART, ExpDir
from comflp.prune.methods import METHOD_LISTS, Method, MethodList
from comflp.utils import atomic_write_json


def methods_and_output(args: argparse.Namespace) -> tuple[MethodList, Callable[[str], Path]]:
    """The methods to decode and where each model's decoding goes."""
    if args.exp_dir is not None:
        exp = ExpDir(args.exp_dir)
        methods = MethodList.load(exp.compare / METHOD_LISTS[args.method_list])
        return methods, lambda key: exp.decoded(args.set, key)
    if args.model_dir is None or args.output_dir is None:
        raise UsageError("give --exp_dir and --set (stage 7), or --model_dir and --output_dir")
    layers = [int(x) for x in args.prune_layers.split()]
    method = Method("model", len(layers), layers, str(args.model_dir), model_type=args.model_type)
    return MethodList([method]), lambda key: args.output_dir / key


def main(args: argparse.Namespace) -> None:
    methods, output = methods_and_output(args)
    device = resolve_device(args.device)
    cuts = load_cuts(args.cuts)
    if len(cuts) == 0:
        raise UsageError(f"--cuts {args.cuts}: the set is empty")
    try:
        cuts = part_of(cuts, args.part, args.num_parts)
    except ValueError as e:
        raise UsageError(f"--part/--num_parts: {e}") from None
    models = {}
    for key, method in methods.unique().items():
        source = (method.model_type, method.model_dir)
        if source not in models:
            models[source] = load_prunable(*source).to(device)
        try:
            pruned = models[source].prune(method.pruned) if method.pruned else models[source]
        except ValueError as e:
            raise UsageError(
                f"{method.name} (P={method.num_prune}) does not fit {method.model_dir}: {e}"
            ) from None
        loader = eval_loader(cuts, pruned.dataset(), args.max_duration)
        result = decode_set(pruned, loader, args.decoding_method, args.beam_size, args.ctc_weight)
        atomic_write_json(
            output(key) / DECODE_PART.format(part=args.part),
            {
                "part": args.part,
                "num_parts": args.num_parts,
                "key": key,
                "model_type": method.model_type,
                "model_dir": method.model_dir,
                "pruned": method.pruned,
                "params": pruned.num_parameters(),
                "decoding_method": args.decoding_method,
                "beam_size": args.beam_size,
                **result.timing(),
                "utts": result.utts,
            },
        )
        logging.info(f"{key}: {len(result.utts)} utterances, RTF {result.rtf:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, help="decode the method list of this experiment")
    parser.add_argument("--method_list", choices=sorted(METHOD_LISTS), default="compare")
    parser.add_argument("--set", help="with --exp_dir: the name of the decoded set")
    parser.add_argument("--model_dir", type=Path, help="decode this one model instead")
    parser.add_argument("--model_type", choices=MODEL_TYPES.names(), default="native")
    parser.add_argument(
        "--prune_layers", default="", help="with --model_dir: layers to remove first"
    )
    parser.add_argument("--output_dir", type=Path, help="with --model_dir: where to write")
    parser.add_argument("--cuts", type=Path, required=True)
    parser.add_argument("--part", type=int, default=1)
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument("--decoding_method", default="ctc_greedy_search")
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument(
        "--ctc_weight", type=float, default=0.3, help="attention_rescoring: CTC score weight"
    )
    parser.add_argument("--max_duration", type=float, default=100.0)
    parser.add_argument("--device", default="auto")
    add_common_args(parser)
    run(main, parser)
