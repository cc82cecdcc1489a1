"""Stage 5: build every score of ``--scores`` once from the dump, into scores/<name>/: the
score's file, a heatmap and settings.json (with the seconds it took, which the searches count);
the scores built from the dump first, then the composites of them (the consensus)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from comflp.errors import InputError
from comflp.expdir import HEATMAP, SCORE_SETTINGS, ExpDir
from comflp.prune.dump import load_layer_feats, read_dump_info
from comflp.prune.scores.base import (
    SCORES,
    ProposalScore,
    ScoreChoice,
    score_options,
    split_scores,
)
from comflp.settings import REQUIRED, option
from comflp.utils import atomic_path, atomic_write_json


@dataclass(kw_only=True)
class ScoreSettings(ScoreChoice):
    """Stage 5: which scores, with which options, from which dump."""

    exp_dir: Path = option(REQUIRED, "the experiment whose dump the scores are built from")
    score_conf: list[str] = option(
        [],
        "a score's option as SCORE.OPTION=VALUE (e.g. dc.batch_size=8); each score declares "
        "its options and defaults in its own Options (comflp/prune/scores/)",
    )
    stack: str = option("encoder", "the stack dumped", choices=("encoder", "decoder"))


def build_scores(s: ScoreSettings) -> None:
    options = score_options(s.scores, s.score_conf)
    split_scores(s.scores)
    exp = ExpDir(s.exp_dir).stack(s.stack)
    info = read_dump_info(exp.dump)
    for name in s.scores:
        if SCORES[name].needs_frames and info["pooling"] != "frames":
            raise InputError(
                f"--scores {name}: {exp.dump} is {info['pooling']}-pooled; the score needs frames "
                "(stage 4 with --pooling frames): on utterance means it ranks proposals poorly "
                "(docs/SEARCH_QUALITY.md)"
            )
    build_all(exp, s.scores, load_layer_feats(exp.dump), info, options)


def build_all(
    exp: ExpDir, names: list[str], feats: list, info: dict, options: dict[str, Any]
) -> dict[str, ProposalScore]:
    """Every score of ``names``: those built from the dump, then the composites of them."""
    members, composites = split_scores(names)
    built: dict[str, ProposalScore] = {}
    for name in members:
        make = partial(SCORES[name].build, feats, options[name])
        built[name] = build_score(exp, name, info, options[name], make)
    parts = {m: built[m] for m in members}
    for name in composites:
        make = partial(SCORES[name].compose, parts, options[name])
        built[name] = build_score(exp, name, info, options[name], make)
    return built


def build_score(
    exp: ExpDir, name: str, info: dict, options: Any, make: Callable[[], ProposalScore]
) -> ProposalScore:
    """One score (``make`` builds it) into scores/<name>/, timed."""
    cls = SCORES[name]
    start = time.perf_counter()
    try:
        score = make()
    except ValueError as e:
        raise InputError(f"--scores {name} on {exp.dump}: {e}") from None
    seconds = time.perf_counter() - start
    out_dir = exp.score(name)
    with atomic_path(out_dir / cls.file_name) as tmp:
        score.write(tmp)
    used = asdict(options)
    score.heatmap(
        out_dir / HEATMAP,
        f"{name}{f' {used}' if used else ''}\n({info['pooling']} pooling, {info['num_utts']} utterances)",
    )
    atomic_write_json(
        out_dir / SCORE_SETTINGS,
        {
            "score": name,
            "options": used,
            "dump_dir": str(exp.dump),
            **{
                k: info[k]
                for k in ("stack", "pooling", "num_utts", "num_rows", "num_layers")
                if k in info
            },
            "seconds": seconds,
        },
    )
    logging.info(f"{out_dir}: {name} over {info['num_rows']} rows in {seconds:.2f} s")
    return score
