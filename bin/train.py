#!/usr/bin/env python3
"""Stage 3: train the baseline (Transformer CTC, intermediate CTC, stochastic depth) into an experiment directory.

Also stage 8 with --init_model: fine-tune a pruned model; with --model_type hf or espnet a
Hugging Face or ESPnet2 model, through its adapter (comflp/train/trainer.py: AdapterTrainer),
written back in its own format. Run under torchrun for several processes (comflp models only).
"""

import argparse
import logging
import os
from pathlib import Path

import torch

from comflp.adapters import MODEL_TYPES, load_prunable
from comflp.asr.checkpoint import copy_assets, load_checkpoint, load_experiment_config
from comflp.asr.config import load_config
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
    str2bool,
)
from comflp.expdir import CMVN, MODEL, TOKENIZER
from comflp.train.trainer import AdapterTrainer, Dist, train


def finetune_adapter(args: argparse.Namespace, dist_info: Dist, device: str) -> bool:
    """Stage 8 for a model of another library: fine-tune --init_model through its adapter."""
    if dist_info.world_size > 1:
        raise UsageError(f"--model_type {args.model_type}: fine-tuning runs in one process only")
    if args.init_model is None:
        raise UsageError(f"--model_type {args.model_type} needs --init_model (the pruned model)")
    try:
        adapter = load_prunable(args.model_type, args.init_model)
    except ValueError as e:
        raise UsageError(f"--init_model {args.init_model}: {e}") from None
    cfg = load_config(args.config, parse_overrides(args.set))
    cfg.train.validate(f"{args.config}: train")
    max_seconds = cfg.train.max_utterance_duration
    train_cuts = load_cuts(args.train_cuts).filter(lambda c: c.duration <= max_seconds).to_eager()
    dev_cuts = load_cuts(args.dev_cuts)
    logging.info(f"train: {len(train_cuts)} utterances; dev: {len(dev_cuts)}")
    args.exp_dir.mkdir(parents=True, exist_ok=True)
    trainer = AdapterTrainer(adapter, cfg, args.exp_dir, train_cuts, dev_cuts, device)
    trainer.restore(args.resume, None)
    return trainer.run(args.stop_after_steps)


def main(args: argparse.Namespace) -> None:
    dist_info = Dist.from_env()
    device = resolve_device(args.device)
    if args.model_type != "native":
        if not finetune_adapter(args, dist_info, device):
            raise SystemExit(3)
        return
    if dist_info.world_size > 1 and not args.nthreads:
        # The processes on this node share its cores (several threads each would thrash).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    if dist_info.world_size > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{dist_info.local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    exp_dir: Path = args.exp_dir
    cfg = load_config(args.config, parse_overrides(args.set))
    init_state = assets_dir = None
    if args.init_model:
        # Fine-tuning: the architecture is the pruned model's, the training section this config's.
        assets_dir = args.init_model
        cfg.model = load_experiment_config(assets_dir).model
        init_state = load_checkpoint(assets_dir / MODEL)["model"]
    if dist_info.is_main and not (exp_dir / TOKENIZER).is_file():
        # A new experiment directory gets its own copies; an existing one keeps its own.
        if assets_dir is not None:
            copy_assets(assets_dir, assets_dir / CMVN, exp_dir)
        elif args.lang_dir is None or args.cmvn is None:
            raise UsageError("--lang_dir and --cmvn are needed unless --init_model is given")
        else:
            copy_assets(args.lang_dir, args.cmvn, exp_dir)
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    tokenizer = Tokenizer(exp_dir / TOKENIZER)
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.validate(str(args.config))
    cmvn = load_cmvn(exp_dir / CMVN)
    train_cuts = ctc_feasible(
        load_cuts(args.train_cuts), tokenizer, "train", cfg.model.ctc_upsample
    )
    train_cuts = train_cuts.filter(
        lambda c: c.duration <= cfg.train.max_utterance_duration
    ).to_eager()
    dev_cuts = ctc_feasible(load_cuts(args.dev_cuts), tokenizer, "dev", cfg.model.ctc_upsample)
    logging.info(f"train: {len(train_cuts)} utterances; dev: {len(dev_cuts)}")
    done = train(
        cfg,
        exp_dir,
        train_cuts,
        dev_cuts,
        tokenizer,
        cmvn,
        device=device,
        resume=args.resume,
        init_state=init_state,
        stop_after_steps=args.stop_after_steps,
        amp=args.amp,
        dist_info=dist_info,
    )
    if dist_info.world_size > 1:
        torch.distributed.destroy_process_group()
    if not done:
        raise SystemExit(3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML with model: and train: sections"
    )
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--train_cuts", type=Path, required=True)
    parser.add_argument("--dev_cuts", type=Path, required=True)
    parser.add_argument("--lang_dir", type=Path, help="tokenizer directory of stage 2")
    parser.add_argument("--cmvn", type=Path, help="cmvn.json of stage 1")
    parser.add_argument(
        "--init_model",
        type=Path,
        help="initialise from the model in this directory (fine-tuning a pruned model)",
    )
    parser.add_argument(
        "--model_type",
        choices=MODEL_TYPES.names(),
        default="native",
        help="the library of --init_model (not native: fine-tuned through its adapter)",
    )
    add_training_args(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", type=str2bool, default=False, help="bf16 autocast on GPU")
    add_common_args(parser)
    run(main, parser)
