#!/usr/bin/env python3
"""Stage 4, step 1: dump the encoder input and every layer's output for part --part of --num_parts
of a calibration subset (kaldiio ark/scp); bin/merge_dump.py joins the parts."""

import argparse
from pathlib import Path

from comflp.asr.checkpoint import CMVN_NAME, load_model
from comflp.asr.data import AsrDataset, eval_loader, load_cuts, part_of, random_subset
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import MODEL_NAME as TOKENIZER_NAME
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import UsageError, add_common_args, resolve_device, run
from comflp.prune.dump import POOLINGS, dump_layers


def main(args: argparse.Namespace) -> None:
    model = load_model(args.exp_dir, args.checkpoint)
    if not 1 <= args.part <= args.num_parts:
        raise UsageError(f"--part {args.part} must be between 1 and --num_parts {args.num_parts}")
    calibration = random_subset(load_cuts(args.cuts), args.num_utts, args.seed)
    cuts = part_of(calibration, args.part, args.num_parts)
    dataset = AsrDataset(
        Tokenizer(args.exp_dir / TOKENIZER_NAME), load_cmvn(args.exp_dir / CMVN_NAME)
    )
    dump_layers(
        model,
        eval_loader(cuts, dataset, args.max_duration),
        args.output_dir,
        pooling=args.pooling,
        frames_per_utt=args.frames_per_utt,
        seed=args.seed,
        device=resolve_device(args.device),
        extra_info={
            "exp_dir": str(args.exp_dir),
            "checkpoint": args.checkpoint,
            "cuts": str(args.cuts),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--exp_dir", type=Path, required=True, help="experiment directory of the model"
    )
    parser.add_argument("--checkpoint", default="model.pt")
    parser.add_argument(
        "--cuts", type=Path, required=True, help="cuts to draw the calibration subset from"
    )
    parser.add_argument(
        "--num_utts", type=int, default=320, help="calibration utterances (CoMFLP: 32 x 10)"
    )
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument(
        "--frames_per_utt",
        type=int,
        default=0,
        help="frames pooling: random frames kept per utterance (0: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_duration", type=float, default=100.0, help="seconds of audio per batch"
    )
    parser.add_argument("--part", type=int, default=1, help="which part (1-based) to dump")
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument("--output_dir", type=Path, required=True, help="this part's dump directory")
    parser.add_argument("--device", default="auto")
    add_common_args(parser)
    run(main, parser)
