"""Stage 4: dump the chosen stack's input and every layer's output over a calibration subset,
in parts (a job array), then merge the parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comflp.adapters.base import ModelSettings
from comflp.asr.data import (
    EVAL_MAX_DURATION,
    length_sorted_loader,
    load_cuts,
    part_of,
    random_subset,
)
from comflp.errors import InputError
from comflp.expdir import ExpDir
from comflp.prune.dump import FRAMES_PER_UTT, POOLING, POOLINGS, dump_layers, merge_dumps
from comflp.prune.stacks import stack_of
from comflp.settings import REQUIRED, option


@dataclass(kw_only=True)
class DumpSettings(ModelSettings):
    """Stage 4: which utterances are dumped and how their rows are pooled."""

    cuts: Path = option(REQUIRED, "cuts the calibration subset is drawn from")
    calib_num_utts: int = option(320, "calibration utterances (CoMFLP: 10 batches of 32)", low=2)
    pooling: str = option(
        POOLING,
        "frames, or utterance means (mean, CoMFLP's); residual_sum needs frames",
        choices=POOLINGS,
    )
    frames_per_utt: int = option(
        FRAMES_PER_UTT, "frames pooling: random frames kept per utterance (0: all)"
    )
    seed: int = option(0, "seed of the calibration subset and the frame sample")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per batch")
    part: int = option(1, "which part (1-based) of the job array")
    num_parts: int = option(1, "parts of the job array")


def dump_part(s: DumpSettings) -> None:
    """Dump part ``s.part`` of ``s.num_parts`` of the calibration subset into dump/parts/<part>/."""
    if not 1 <= s.part <= s.num_parts:
        raise InputError(f"--part {s.part} must be between 1 and --num_parts {s.num_parts}")
    model = s.load_model()
    stack = stack_of(model, s.stack)
    calibration = random_subset(load_cuts(s.cuts), s.calib_num_utts, s.seed)
    dump_layers(
        stack,
        length_sorted_loader(
            part_of(calibration, s.part, s.num_parts), model.dataset(), s.max_duration
        ),
        ExpDir(s.exp_dir).stack(s.stack).dump_part(s.part),
        pooling=s.pooling,
        frames_per_utt=s.frames_per_utt,
        seed=s.seed,
        extra_info={
            "model_type": model.model_type,
            "model_dir": str(model.source),
            "interctc_layers": list(model.interctc_layers) if s.stack == "encoder" else [],
            "cuts": str(s.cuts),
        },
    )


@dataclass(kw_only=True)
class MergeDumpSettings:
    exp_dir: Path = option(REQUIRED, "holds dump/parts/1 .. N")
    stack: str = option("encoder", "the stack dumped", choices=("encoder", "decoder"))
    num_parts: int = option(1, "parts of the job array")


def merge_dump(s: MergeDumpSettings) -> None:
    exp = ExpDir(s.exp_dir).stack(s.stack)
    merge_dumps([exp.dump_part(j) for j in range(1, s.num_parts + 1)], exp.dump)
