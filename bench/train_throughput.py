#!/usr/bin/env python3
"""Benchmark: training throughput of a config, one process against data-parallel processes.

Trains a fresh model of --config on real batches of the built-in corpus (stages 0-2 must have
run in --workdir) exactly as comflp.train.trainer does a step (SpecAugment if the config asks,
forward with intermediate CTC and stochastic depth, backward, gradient clipping, Adam), in:

- one process with torch's default number of threads;
- one process with 1 thread;
- --nproc processes x 1 thread, DDP over gloo (as ``./run.sh --nproc 2``): each process takes
  its share of every batch (max_duration / nproc, the trainer's split), throughput combined;
- on GPU, when CUDA is available: one process in float32 and with bf16 autocast.

Each setting runs in fresh processes (torch.multiprocessing, spawn). The batches are read into
memory before timing, so data loading is not counted; after --warmup steps, --steps steps are
timed (all processes synchronised before and after). Reports utterances/s, input frames/s (10 ms
frames) and seconds of audio trained per second. Prints a Markdown table, also to --output.

    python bench/train_throughput.py --workdir . --config conf/train.yaml --output exp/bench/train.md
    python bench/train_throughput.py --workdir /tmp/tiny --config conf/train_tiny.yaml \\
        --tokenizer_dir /tmp/tiny/data/lang_bpe48 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import emit, gpu_note
from lhotse import CutSet
from lhotse.dataset import SpecAugment

from comflp.asr.config import ExperimentConfig, load_config
from comflp.asr.data import AsrDataset, ctc_feasible, load_cuts, train_sampler
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import TOKENIZER
from comflp.train.trainer import make_optimizer

# Seconds per fbank frame: audio s/s is counted from the frames (feat_lens), not batch["seconds"],
# so that it is the frames/s column in seconds.
FRAME_SHIFT = 0.01


@dataclass(frozen=True)
class Setting:
    name: str
    nproc: int
    threads: int  # per process; 0: torch's default
    device: str = "cpu"
    bf16: bool = False


# ----------------------------------------------------------------------------- one process


def experiment(args: argparse.Namespace) -> tuple[ExperimentConfig, AsrDataset, CutSet]:
    """The config (vocabulary filled in), the dataset and the trainable cuts, as stage 3 has them."""
    tokenizer_dir = args.tokenizer_dir or args.workdir / "data" / "lang_char"
    tokenizer = Tokenizer(tokenizer_dir / TOKENIZER)
    cfg = load_config(args.config)
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.validate(str(args.config))
    cuts = load_cuts(args.workdir / f"data/fbank/cuts_{args.train_set}.jsonl.gz")
    cuts = ctc_feasible(cuts, tokenizer, "train", cfg.model.ctc_upsample)
    cuts = cuts.filter(lambda c: c.duration <= cfg.train.max_utterance_duration).to_eager()
    return cfg, AsrDataset(tokenizer, load_cmvn(args.workdir / args.cmvn)), cuts


def rank_batches(
    cfg: ExperimentConfig, dataset: AsrDataset, cuts: CutSet, count: int, nproc: int, rank: int
) -> list[dict]:
    """This rank's first ``count`` batches of epoch 1 (repeated if the epoch is shorter)."""
    tc = cfg.train
    sampler = train_sampler(cuts, tc.max_duration / nproc, tc.num_buckets, tc.seed, nproc, rank)
    sampler.set_epoch(1)
    batches = [dataset[c] for c in islice(sampler, count)]
    return [batches[i % len(batches)] for i in range(count)]


def spec_augment_of(cfg: ExperimentConfig) -> SpecAugment | None:
    tc = cfg.train
    if not tc.spec_augment:
        return None
    return SpecAugment(
        time_warp_factor=tc.time_warp_factor,
        num_feature_masks=tc.num_feature_masks,
        features_mask_size=tc.features_mask_size,
        num_frame_masks=tc.num_frame_masks,
        frames_mask_size=tc.frames_mask_size,
        p=1.0,
    )


def augmented(feats: torch.Tensor, lens: torch.Tensor, spec: SpecAugment | None) -> torch.Tensor:
    if spec is None:
        return feats
    segments = torch.stack([torch.arange(feats.size(0)), torch.zeros_like(lens), lens], 1).int()
    return spec(feats, segments)


def synchronise(device: str, nproc: int) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if nproc > 1:
        dist.barrier()


def worker(rank: int, setting: Setting, args: argparse.Namespace, queue) -> None:
    """One process of a setting: warm up, time the steps, rank 0 reports the combined counts."""
    torch.set_flush_denormal(True)
    if setting.threads:
        torch.set_num_threads(setting.threads)
    if setting.nproc > 1:
        dist.init_process_group("gloo", rank=rank, world_size=setting.nproc)
    cfg, dataset, cuts = experiment(args)
    batches = rank_batches(cfg, dataset, cuts, args.warmup + args.steps, setting.nproc, rank)
    torch.manual_seed(cfg.train.seed + rank)
    model = ASRModel(cfg.model).to(setting.device).train()
    ddp = (
        torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if setting.nproc > 1
        else model
    )
    optimizer = make_optimizer(model, cfg.train)
    spec = spec_augment_of(cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if setting.bf16 else nullcontext()

    def step(batch: dict) -> None:
        feats = augmented(batch["feats"], batch["feat_lens"], spec)
        with autocast:
            loss, _ = ddp(
                feats.to(setting.device),
                batch["feat_lens"].to(setting.device),
                batch["targets"].to(setting.device),
                batch["target_lens"].to(setting.device),
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()

    for batch in batches[: args.warmup]:
        step(batch)
    synchronise(setting.device, setting.nproc)
    start = time.perf_counter()
    for batch in batches[args.warmup :]:
        step(batch)
    synchronise(setting.device, setting.nproc)
    seconds = time.perf_counter() - start
    timed = batches[args.warmup :]
    counts = torch.tensor(
        [sum(len(b["ids"]) for b in timed), sum(int(b["feat_lens"].sum()) for b in timed)],
        dtype=torch.float64,
    )
    if setting.nproc > 1:
        dist.all_reduce(counts)
        dist.destroy_process_group()
    if rank == 0:
        queue.put((torch.get_num_threads(), seconds, counts.tolist()))


# ----------------------------------------------------------------------------- settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setting: Setting, args: argparse.Namespace) -> dict:
    """Run one setting in fresh processes; its throughput."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(setting, args, queue), nprocs=setting.nproc, join=True)
    threads, seconds, (utts, frames) = queue.get()
    return {
        "setting": setting,
        "threads": threads,
        "seconds": seconds,
        "utts_s": utts / seconds,
        "frames_s": frames / seconds,
        "audio_s": frames * FRAME_SHIFT / seconds,
    }


def settings(args: argparse.Namespace) -> list[Setting]:
    found = [
        Setting("1 process, torch default threads", 1, 0),
        Setting("1 process, 1 thread", 1, 1),
        Setting(f"{args.nproc} processes x 1 thread (DDP, gloo)", args.nproc, 1),
    ]
    if torch.cuda.is_available():
        found += [
            Setting("1 process, GPU float32", 1, 0, "cuda"),
            Setting("1 process, GPU bf16 autocast", 1, 0, "cuda", bf16=True),
        ]
    return found


def markdown(rows: list[dict], notes: list[str]) -> str:
    lines = [
        *notes,
        "",
        "| setting | processes | threads / process | device | steps s | utterances/s "
        "| frames/s | audio s/s | vs first row |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s: Setting = r["setting"]
        lines.append(
            f"| {s.name} | {s.nproc} | {r['threads']} | {s.device} | {r['seconds']:.2f} | "
            f"{r['utts_s']:.2f} | {r['frames_s']:.0f} | {r['audio_s']:.1f} | "
            f"{r['utts_s'] / rows[0]['utts_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0 or args.nproc < 1:
        raise UsageError("--steps and --nproc must be >= 1, --warmup >= 0")
    cfg = load_config(args.config)
    rows = [measure(s, args) for s in settings(args)]
    notes = [
        f"Config {args.config} ({cfg.model.num_layers} layers, d_model {cfg.model.d_model}), "
        f"batches of {cfg.train.max_duration:g} s of {args.train_set} per step over all "
        f"processes; {args.warmup} warm-up steps, then {args.steps} timed steps per process "
        f"(batches in memory: data loading not counted). {os.cpu_count()} CPU cores.",
        gpu_note(),
    ]
    emit(markdown(rows, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where stages 0-2 ran")
    parser.add_argument("--config", type=Path, default=Path("conf/train.yaml"))
    parser.add_argument(
        "--tokenizer_dir",
        type=Path,
        help="a stage-2 lang dir or an experiment directory (default: WORKDIR/data/lang_char)",
    )
    parser.add_argument("--cmvn", default="data/fbank/cmvn.json", help="in --workdir")
    parser.add_argument("--train_set", default="train-clean-100")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)
