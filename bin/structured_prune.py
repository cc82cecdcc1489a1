#!/usr/bin/env python3
"""Stage 9: L0 structured pruning (Jiang et al. 2023) of a trained comflp model into an
experiment directory whose model.pt is the physically pruned model."""

import argparse
import logging
import os
from pathlib import Path

from comflp.asr.checkpoint import (
    copy_assets,
    load_checkpoint,
    load_experiment_config,
    load_model,
)
from comflp.asr.config import ExperimentConfig
from comflp.asr.data import ctc_feasible, load_cuts
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import (
    UsageError,
    add_common_args,
    add_training_args,
    parse_overrides,
    resolve_device,
    run,
)
from comflp.expdir import CMVN, MODEL, TOKENIZER
from comflp.structured.config import load_structured_config
from comflp.structured.trainer import structured_prune


def main(args: argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("structured pruning runs in one process (no torchrun)")
    overrides = parse_overrides(args.set)
    if args.target_sparsity is not None:
        overrides["structured.target_sparsity"] = args.target_sparsity
    sp, train_cfg = load_structured_config(args.config, overrides)
    model_cfg = load_experiment_config(args.init_model).model
    sp.validate(model_cfg, f"{args.config}: structured")
    cfg = ExperimentConfig(model=model_cfg, train=train_cfg)
    exp_dir: Path = args.exp_dir
    if not (exp_dir / TOKENIZER).is_file():
        copy_assets(args.init_model, args.init_model / CMVN, exp_dir)
    tokenizer = Tokenizer(exp_dir / TOKENIZER)
    cmvn = load_cmvn(exp_dir / CMVN)
    teacher = load_model(args.teacher or args.init_model)
    upsample = model_cfg.ctc_upsample
    train_cuts = ctc_feasible(load_cuts(args.train_cuts), tokenizer, "train", upsample)
    train_cuts = train_cuts.filter(
        lambda c: c.duration <= train_cfg.max_utterance_duration
    ).to_eager()
    dev_cuts = ctc_feasible(load_cuts(args.dev_cuts), tokenizer, "dev", upsample)
    logging.info(
        f"structured pruning of {args.init_model} to sparsity {sp.target_sparsity} "
        f"(gates: {', '.join(sp.gates)}); train: {len(train_cuts)} utterances"
    )
    done = structured_prune(
        cfg,
        sp,
        exp_dir,
        train_cuts,
        dev_cuts,
        tokenizer,
        cmvn,
        load_checkpoint(args.init_model / MODEL)["model"],
        teacher,
        device=resolve_device(args.device),
        resume=args.resume,
        stop_after_steps=args.stop_after_steps,
    )
    if not done:
        raise SystemExit(3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML with structured: and train: sections"
    )
    parser.add_argument(
        "--init_model", type=Path, required=True, help="the comflp model to prune (stage 3)"
    )
    parser.add_argument(
        "--teacher", type=Path, help="the model to distil from (default: --init_model)"
    )
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--train_cuts", type=Path, required=True)
    parser.add_argument("--dev_cuts", type=Path, required=True)
    parser.add_argument(
        "--target_sparsity", type=float, help="overrides structured.target_sparsity"
    )
    add_training_args(parser)
    parser.add_argument("--device", default="auto")
    add_common_args(parser)
    run(main, parser)
