#!/usr/bin/env python3
"""Stage 7, step 2: decode a set with every distinct pruned model of one or more method lists.

Each (model directory, pruned layers) pair is decoded once: the layers are removed physically
(comflp.asr.model.prune_layers) and the set is decoded with --decoding_method. With --num_parts N,
only part --part of the utterances is decoded (for job arrays); bin/results.py merges parts.
Writes <output_dir>/<key>/part<J>.json: per-utterance ref/hyp, decoding time, audio duration.
Without --methods, --model_dir decodes one model (with optional --prune_layers).
"""

import argparse
import logging
from pathlib import Path

from comflp.asr.checkpoint import CMVN_NAME, load_model
from comflp.asr.data import AsrDataset, eval_loader, load_cuts, part_of
from comflp.asr.decode import METHODS, decode_set
from comflp.asr.features import load_cmvn
from comflp.asr.model import count_parameters, prune_layers
from comflp.asr.tokenizer import MODEL_NAME as TOKENIZER_NAME
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import UsageError, add_common_args, resolve_device, run
from comflp.prune.methods import Method, MethodList
from comflp.utils import atomic_write_json


def main(args: argparse.Namespace) -> None:
    if args.methods:
        methods = MethodList.load(*args.methods)
    elif args.model_dir:
        layers = [int(x) for x in args.prune_layers.split()]
        methods = MethodList([Method("model", len(layers), layers, str(args.model_dir))])
    else:
        raise UsageError("give --methods (stage 7) or --model_dir")
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
        model_dir = Path(method.model_dir)
        if model_dir not in models:
            models[model_dir] = load_model(model_dir)
        model = models[model_dir]
        try:
            pruned = prune_layers(model, method.pruned) if method.pruned else model
        except ValueError as e:
            raise UsageError(
                f"{method.name} (P={method.num_prune}) does not fit {model_dir}: {e}"
            ) from None
        tokenizer = Tokenizer(model_dir / TOKENIZER_NAME)
        loader = eval_loader(
            cuts, AsrDataset(tokenizer, load_cmvn(model_dir / CMVN_NAME)), args.max_duration
        )
        result = decode_set(
            pruned.eval(),
            loader,
            tokenizer,
            args.decoding_method,
            args.beam_size,
            args.ctc_weight,
            device,
        )
        atomic_write_json(
            args.output_dir / key / f"part{args.part}.json",
            {
                "part": args.part,
                "num_parts": args.num_parts,
                "key": key,
                "model_dir": str(model_dir),
                "pruned": method.pruned,
                "params": count_parameters(pruned),
                "decoding_method": args.decoding_method,
                "beam_size": args.beam_size,
                **result.timing(),
                "utts": result.utts,
            },
        )
        logging.info(f"{key}: {len(result.utts)} utterances, RTF {result.rtf:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", type=Path, nargs="*", help="methods.json files of stage 7/8")
    parser.add_argument("--model_dir", type=Path, help="decode this one model instead")
    parser.add_argument(
        "--prune_layers", default="", help="with --model_dir: layers to remove first"
    )
    parser.add_argument("--cuts", type=Path, required=True)
    parser.add_argument("--part", type=int, default=1)
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument("--decoding_method", choices=METHODS, default="ctc_greedy_search")
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument(
        "--ctc_weight", type=float, default=0.3, help="attention_rescoring: CTC score weight"
    )
    parser.add_argument("--max_duration", type=float, default=100.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", type=Path, required=True)
    add_common_args(parser)
    run(main, parser)
