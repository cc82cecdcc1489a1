"""How well does a coarse score predict the pruned model's accuracy? (the search-quality study)

For P pruned layers, the study takes a set of proposals, evaluates the dev CER of each one's
pruned model and compares every scoring variant's coarse scores with those CERs:

- :func:`~comflp.prune.ranks.spearman` and :func:`~comflp.prune.ranks.kendall_tau` (tau-b)
  between score and CER (a good score has a strongly negative correlation: higher score, lower
  CER);
- :func:`top1_percentile`: how many proposals the coarse top-1 beats;
- :func:`best_of_top_k_regret`: the CER of the best of the top K (what the fine search finds)
  against the oracle (the lowest CER of the set).

Proposals (:func:`proposal_set`): all C(L, P) when there are at most ``cap``, else a seeded
uniform random sample of ``sample_size`` proposals plus the coarse top-K of every variant (so
that the top-K statistics are exact). The rank statistics and the percentile use the uniform
part only (all proposals in the exhaustive case), an unbiased view of the whole population;
the regrets use every proposal, so with a sample the "oracle" is the best of the set.

Features (:class:`StudyFeatures`): one frame-pooled dump of the largest calibration size
serves every variant. The N-utterance variants take the first N utterances of a seeded
permutation of the dumped ones (nested subsets, random order so that dc's consecutive batches
are random batches). Mean pooling averages each utterance's dumped frames: exact when an
utterance has no more than ``frames_per_utt`` frames (or the dump kept all frames), else the
mean of a random sample of them. Frame pooling keeps at most ``frame_rows`` rows (a seeded
sample, the same rows at every layer index), as the kernel measures are quadratic in rows.
A dc batch size counts rows, as in stage 5: with frame pooling a batch holds consecutive
frames, mostly of one utterance.

CERs are cached per P in a JSON file (:func:`proposal_cers`), written after every chunk, so an
interrupted study resumes and a rerun evaluates nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from comflp.asr.data import EVAL_ORDER
from comflp.errors import InputError
from comflp.prune.dump import DumpError, read_dump_info, read_layer
from comflp.prune.metric_search import fine_search
from comflp.prune.ranks import kendall_tau, paired, spearman
from comflp.prune.scores.base import SCORES, ProposalScore
from comflp.prune.scores.consensus import ConsensusScorer
from comflp.prune.search import (
    COARSE_BEAM_SIZE,
    COARSE_TOP_K,
    DEFAULT_MAX_EXHAUSTIVE,
    coarse_search,
    score_proposals,
)
from comflp.prune.stacks import LayerStack
from comflp.subsets import kept_layers
from comflp.utils import atomic_write_json

TOP_KS = (1, 3, 5, 10)
CALIB_SIZES = (32, 64, 128, 320, 1280)
DC_BATCH_SIZES = (4, 32, None)
REFERENCE_NUM_UTTS = 320

# ----------------------------------------------------------------------------- top-K quality


def ranking(scores: Any) -> np.ndarray:
    """Indices best score first; ties keep the given order (as the coarse search does)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top1_percentile(scores: Any, cer: Any) -> float:
    """Fraction of the other proposals whose CER is strictly worse (higher) than the CER of
    the coarse top-1 (the highest score; among tied scores the first). Proposals with the
    same CER as the top-1 count as not beaten, so 1.0 means the top-1 is the unique best."""
    scores, cer = paired(scores, cer)
    top = ranking(scores)[0]
    return float(np.sum(cer > cer[top])) / (len(cer) - 1)


def best_of_top_k_regret(scores: Any, cer: Any, k: int) -> dict[str, float | None]:
    """The lowest CER among the ``k`` best-scored proposals (``cer``), the oracle's lowest
    CER of all (``oracle``), their difference (``regret``) and the difference relative to
    the oracle (``relative``: 0 for no regret, None for a regret over an oracle CER of 0)."""
    scores, cer = paired(scores, cer)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    best = float(cer[ranking(scores)[:k]].min())
    oracle = float(cer.min())
    regret = best - oracle
    return {
        "cer": best,
        "oracle": oracle,
        "regret": regret,
        "relative": regret / oracle if oracle > 0 else (0.0 if regret == 0 else None),
    }


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way to score proposals: a registered score on features of one pooling and
    calibration size, and a block-score aggregation (see :mod:`comflp.prune.search`)."""

    score: str
    pooling: str
    num_utts: int
    batch_size: int | None = None  # dc only; None: one batch of all rows
    aggregation: str = "mean"

    @property
    def label(self) -> str:
        """The score with its dc batch size, e.g. ``dc_b32`` or ``dc_ball``."""
        if self.score != "dc":
            return self.score
        return f"dc_b{self.batch_size or 'all'}"

    @property
    def name(self) -> str:
        agg = "" if self.aggregation == "mean" else f"/{self.aggregation}"
        return f"{self.label}/{self.pooling}/N{self.num_utts}{agg}"

    @property
    def options(self) -> Any:
        """The score's options: its defaults, with the variant's dc batch size."""
        if self.score != "dc":
            return SCORES[self.score].Options()
        return SCORES["dc"].Options(batch_size=self.batch_size or 0)

    @property
    def matrix_key(self) -> tuple:
        """Variants with the same key share one built score."""
        return (self.score, self.batch_size, self.pooling, self.num_utts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": self.score,
            "options": asdict(self.options),
            "pooling": self.pooling,
            "num_utts": self.num_utts,
            "aggregation": self.aggregation,
        }


def study_variants(
    scores: Sequence[str],
    poolings: Sequence[str],
    sizes: Sequence[int],
    rows: Callable[[str, int], int],
    reference_num_utts: int,
    dc_batch_sizes: Sequence[int | None] = DC_BATCH_SIZES,
    aggregations: Sequence[str] = ("mean", "damage"),
) -> list[Variant]:
    """Every score x pooling x calibration size (dc once per batch size), with the mean
    aggregation; the other aggregations at the reference size only, for the scores that
    aggregate blocks. A score that needs frames is left out of mean pooling.
    ``rows(pooling, n)`` is the number of feature rows of that variant: a dc batch size not
    below it equals one batch of all rows and is left out."""
    out = []
    for pooling in poolings:
        for n in sizes:
            for score in scores:
                if pooling != "frames" and SCORES[score].needs_frames:
                    continue
                for b in dc_batch_sizes if score == "dc" else (None,):
                    if b is not None and b >= rows(pooling, n):
                        continue
                    for agg in aggregations:
                        blocks = SCORES[score].aggregates
                        if agg == "mean" or (n == reference_num_utts and blocks):
                            out.append(Variant(score, pooling, n, b, agg))
    return out


# ----------------------------------------------------------------------------- features


class StudyFeatures:
    """Per-variant features derived from one frame-pooled dump (module docstring)."""

    def __init__(self, dump_dir: Path, frame_rows: int, seed: int = 0):
        dump_dir = Path(dump_dir)
        self.info = read_dump_info(dump_dir)
        if self.info["pooling"] != "frames":
            raise DumpError(f"{dump_dir}: the study needs a frames-pooled dump")
        if frame_rows < 2:
            raise ValueError(f"frame_rows must be >= 2, got {frame_rows}")
        self.frame_rows, self.seed = frame_rows, seed
        utts = self.info["utts"]
        order = np.random.default_rng(seed).permutation(len(utts))
        self.utts = [utts[i] for i in order]
        self.frames = [
            read_layer(dump_dir, k, self.utts) for k in range(self.info["num_layers"] + 1)
        ]
        self.lengths = np.array([len(a) for a in self.frames[0]])

    @property
    def num_utts(self) -> int:
        return len(self.utts)

    def _frame_rows(self, n: int) -> np.ndarray | None:
        total = int(self.lengths[:n].sum())
        if total <= self.frame_rows:
            return None
        rng = np.random.default_rng(self.seed + n)
        return np.sort(rng.choice(total, size=self.frame_rows, replace=False))

    def rows(self, pooling: str, n: int) -> int:
        if pooling == "mean":
            return n
        return min(int(self.lengths[:n].sum()), self.frame_rows)

    def layer_feats(self, pooling: str, n: int) -> list[np.ndarray]:
        """The L+1 (rows, D) arrays of the first ``n`` utterances with ``pooling``."""
        if not 2 <= n <= self.num_utts:
            raise ValueError(f"calibration size {n} is not in 2..{self.num_utts} (dumped)")
        if pooling == "mean":
            return [np.stack([a.mean(0) for a in layer[:n]]) for layer in self.frames]
        keep = self._frame_rows(n)
        feats = [np.concatenate(layer[:n]) for layer in self.frames]
        return feats if keep is None else [f[keep] for f in feats]


def variant_scores(
    features: StudyFeatures, variants: Sequence[Variant]
) -> dict[tuple, tuple[ProposalScore, float]]:
    """The built score of each distinct matrix key and the seconds it took."""
    out: dict[tuple, tuple[ProposalScore, float]] = {}
    cache: dict[tuple[str, int], list[np.ndarray]] = {}
    for v in tqdm(variants, desc="scores", unit="variant", mininterval=10):
        if v.matrix_key in out:
            continue
        if (v.pooling, v.num_utts) not in cache:
            cache[(v.pooling, v.num_utts)] = features.layer_feats(v.pooling, v.num_utts)
        feats = cache[(v.pooling, v.num_utts)]
        start = time.perf_counter()
        score = SCORES[v.score].build(feats, v.options)
        out[v.matrix_key] = (score, time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------- proposals


def _random_proposals(
    num_layers: int, num_prune: int, size: int, rng: np.random.Generator
) -> set[tuple[int, ...]]:
    drawn: set[tuple[int, ...]] = set()
    while len(drawn) < size:
        pick = rng.choice(num_layers, size=num_prune, replace=False) + 1
        drawn.add(tuple(sorted(int(x) for x in pick)))
    return drawn


def proposal_set(
    num_layers: int,
    num_prune: int,
    scorers: Sequence[Any],
    cap: int = 1000,
    sample_size: int = 300,
    top_k: int = max(TOP_KS),
    seed: int = 0,
) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The proposals of the study in lexicographic order, and which of them belong to the
    uniform part (module docstring). ``scorers``: every variant's proposal scorer, whose
    coarse top ``top_k`` (exhaustive when C(L, P) allows, else beam) are included."""
    count = math.comb(num_layers, num_prune)
    if count <= max(cap, sample_size):
        every = list(combinations(range(1, num_layers + 1), num_prune))
        return every, np.ones(len(every), dtype=bool)
    uniform = _random_proposals(num_layers, num_prune, sample_size, np.random.default_rng(seed))
    top: set[tuple[int, ...]] = set()
    mode = "exhaustive" if count <= DEFAULT_MAX_EXHAUSTIVE else "beam"
    for scorer in scorers:
        top.update(p.layers for p in coarse_search(scorer, num_prune, mode, top_k, top_k))
    proposals = sorted(uniform | top)
    return proposals, np.array([p in uniform for p in proposals])


# ----------------------------------------------------------------------------- CER cache


def dev_settings(s: Any, model_dir: str, stack: str) -> dict[str, Any]:
    """What makes two runs' cached CERs the same ones: the model, its stack and the dev batches
    (``s``: settings with ``dev_cuts``, ``dev_num_utts``, ``seed`` and ``max_duration``)."""
    return {
        "model_dir": model_dir,
        "stack": stack,
        "dev_cuts": str(s.dev_cuts),
        "dev_num_utts": s.dev_num_utts,
        "seed": s.seed,
        "max_duration": s.max_duration,
        "batch_order": EVAL_ORDER,
    }


class CerCache:
    """CERs of proposals (and fine-search timings) for one P, in a JSON file that is written
    atomically after every change; refuses a file made with other settings."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.data: dict[str, Any] = {"settings": settings, "cers": {}, "fine": {}}
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            if stored.get("settings") != settings:
                raise InputError(
                    f"{self.path}: made with other settings ({stored.get('settings')}, now "
                    f"{settings}); use another --output_dir or delete the file"
                )
            self.data = stored

    @staticmethod
    def key(layers: Sequence[int]) -> str:
        return ",".join(str(x) for x in layers)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def proposal_cers(
    stack: LayerStack,
    batches: list[dict],
    proposals: Sequence[tuple[int, ...]],
    cache: CerCache,
    chunk: int = 100,
) -> np.ndarray:
    """Dev CER of each proposal's pruned model (prefix-cached evaluation), taking what
    ``cache`` has and adding the rest to it, ``chunk`` proposals at a time."""
    cers = cache.data["cers"]
    todo = [p for p in proposals if cache.key(p) not in cers]
    for start in tqdm(range(0, len(todo), chunk), desc="proposal CERs", unit="chunk"):
        part = todo[start : start + chunk]
        subsets = [kept_layers(stack.num_layers, p) for p in part]
        for p, r in zip(part, stack.evaluate(batches, subsets), strict=True):
            cers[cache.key(p)] = {"cer": r.cer, "wer": r.wer, "loss": r.loss, "seconds": r.seconds}
        cache.save()
    return np.array([cers[cache.key(p)]["cer"] for p in proposals])


def timed_fine_search(
    stack: LayerStack,
    batches: list[dict],
    scorer: Any,
    num_prune: int,
    cache: CerCache,
    beam_size: int = COARSE_BEAM_SIZE,
    top_k: int = COARSE_TOP_K,
) -> dict[str, Any]:
    """CoMFLP as stage 6 runs it on one score: the beam search's top ``top_k`` and their fine
    search; seconds of each step, the top ``top_k``, the chosen layers and their CER. The fine search's choice is
    read from the CER cache (the best of the top K, as the fine search picks it); its time,
    which does not depend on the scoring variant (K evaluations with the prefix cache), is
    measured once per P by running it on the first variant's top K."""
    start = time.perf_counter()
    proposals = coarse_search(scorer, num_prune, "beam", beam_size, top_k)
    coarse_seconds = time.perf_counter() - start
    layers = [tuple(p.layers) for p in proposals]
    cers = proposal_cers(stack, batches, layers, cache)
    if "seconds" not in cache.data["fine"]:
        cache.data["fine"]["seconds"] = fine_search(stack, batches, layers)[1]
        cache.save()
    best = int(np.argmin(cers))
    return {
        "beam_seconds": coarse_seconds,
        "fine_seconds": cache.data["fine"]["seconds"],
        "beam_layers": [list(p) for p in layers],
        "fine_layers": list(layers[best]),
        "fine_cer": float(cers[best]),
    }


def teacher_forced_quality(
    stack: LayerStack,
    batches: list[dict],
    proposals: Sequence[tuple[int, ...]],
    cer: np.ndarray,
    uniform: np.ndarray,
    cache: CerCache,
) -> dict[str, Any] | None:
    """For a decoder stack: how the teacher-forced NLL (the cheap metric, no decoding) ranks
    the proposals against the CER of real greedy decoding, as a score (minus the NLL) would,
    and the seconds of one loss-only pass over them all against those of decoding them
    (the pass is timed once and cached). None for other stacks or an older cache."""
    entries = [cache.data["cers"][cache.key(p)] for p in proposals]
    if stack.name != "decoder" or any("loss" not in e for e in entries):
        return None
    if "teacher_forced_seconds" not in cache.data["fine"]:
        subsets = [kept_layers(stack.num_layers, p) for p in proposals]
        start = time.perf_counter()
        stack.evaluate(batches, subsets, metric="loss")
        cache.data["fine"]["teacher_forced_seconds"] = time.perf_counter() - start
        cache.save()
    loss = np.array([e["loss"] for e in entries])
    return {
        **variant_quality(-loss, cer, uniform),
        "seconds": cache.data["fine"]["teacher_forced_seconds"],
        "decode_seconds": sum(e["seconds"] for e in entries),
        "best_layers": list(proposals[int(np.argmin(loss))]),
    }


# ----------------------------------------------------------------------------- one variant


def variant_quality(
    scores: np.ndarray, cer: np.ndarray, uniform: np.ndarray, ks: Sequence[int] = TOP_KS
) -> dict[str, Any]:
    """Rank statistics over the uniform part, the top-1's percentile among the uniform part,
    and the best-of-top-K regrets over every proposal."""
    pool = uniform.copy()
    pool[ranking(scores)[0]] = True  # the top-1 of all is the top-1 of the pool too
    return {
        "spearman": spearman(scores[uniform], cer[uniform]),
        "kendall": kendall_tau(scores[uniform], cer[uniform]),
        "top1_percentile": top1_percentile(scores[pool], cer[pool]),
        "regret": {str(k): best_of_top_k_regret(scores, cer, k) for k in ks},
    }


@dataclass
class Entry:
    """One row of the study: what it is (a variant's ``to_dict``), its scorer and the seconds
    its score took to build."""

    info: dict[str, Any]
    scorer: Any
    seconds: float


def study_entries(
    variants: Sequence[Variant],
    built: dict[tuple, tuple[ProposalScore, float]],
    consensus_of: Sequence[Variant] = (),
) -> list[Entry]:
    """Every variant's row, and the consensus of ``consensus_of`` (stage 6's consensus of the
    default scores, :mod:`comflp.prune.scores.consensus`) when it names two or more variants."""
    entries = [
        Entry(v.to_dict(), built[v.matrix_key][0].scorer(v.aggregation), built[v.matrix_key][1])
        for v in variants
    ]
    if len(consensus_of) > 1:
        first = consensus_of[0]
        info = {**first.to_dict(), "name": f"consensus/{first.pooling}/N{first.num_utts}"}
        info.update(score="consensus", options={"of": [v.name for v in consensus_of]})
        scorer = ConsensusScorer(
            [built[v.matrix_key][0].scorer(v.aggregation) for v in consensus_of]
        )
        entries.append(Entry(info, scorer, sum(built[v.matrix_key][1] for v in consensus_of)))
    return entries


def study_num_prune(
    stack: LayerStack,
    batches: list[dict],
    entries: Sequence[Entry],
    num_prune: int,
    cache: CerCache,
    dump_seconds_per_utt: float,
    cap: int = 1000,
    sample_size: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """The study for one P: proposals and their CERs, and every entry's scores, quality and
    CoMFLP search time (the dump's share for its N utterances, its score, the beam search and
    the fine search of the top 10)."""
    proposals, uniform = proposal_set(
        stack.num_layers, num_prune, [e.scorer for e in entries], cap, sample_size, seed=seed
    )
    cer = proposal_cers(stack, batches, proposals, cache)
    layers = np.array(proposals)
    rows = []
    for e in tqdm(entries, desc=f"variants, P={num_prune}", unit="variant", mininterval=10):
        scores = score_proposals(e.scorer, layers)
        timing = timed_fine_search(stack, batches, e.scorer, num_prune, cache)
        dump_seconds = dump_seconds_per_utt * e.info["num_utts"]
        total = dump_seconds + e.seconds + timing["beam_seconds"] + timing["fine_seconds"]
        rows.append(
            {
                **e.info,
                **variant_quality(scores, cer, uniform),
                "dump_seconds": dump_seconds,
                "matrix_seconds": e.seconds,
                **timing,
                "total_seconds": total,
                "scores": scores.tolist(),
            }
        )
    best = int(np.argmin(cer))
    entries = cache.data["cers"]
    return {
        "teacher_forced": teacher_forced_quality(stack, batches, proposals, cer, uniform, cache),
        "num_prune": num_prune,
        "num_proposals": len(proposals),
        "exhaustive": bool(uniform.all()),
        "num_uniform": int(uniform.sum()),
        "oracle_layers": list(proposals[best]),
        "oracle_cer": float(cer[best]),
        "evaluation_seconds": sum(entries[cache.key(p)]["seconds"] for p in proposals),
        "proposals": [
            {"layers": list(p), "cer": float(c), "uniform": bool(u)}
            for p, c, u in zip(proposals, cer, uniform, strict=True)
        ],
        "variants": rows,
    }


def smallest_matching_size(rows: Sequence[dict], reference_num_utts: int) -> int | None:
    """The smallest calibration size whose best-of-top-10 CER equals the reference size's,
    among one family's rows (same measure, pooling, aggregation); None without the reference."""
    best = {r["num_utts"]: r["regret"][str(max(TOP_KS))]["cer"] for r in rows}
    if reference_num_utts not in best:
        return None
    return min(n for n, c in best.items() if c == best[reference_num_utts])


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of one P's variants."""
    ks = [str(k) for k in TOP_KS]
    head = (
        "| variant | Spearman | Kendall | top-1 pct | "
        + " | ".join(f"regret@{k}" for k in ks)
        + " | rel@10 | CoMFLP CER | search s |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for v in result["variants"]:
        rel = v["regret"]["10"]["relative"]
        lines.append(
            f"| {v['name']} | {v['spearman']:.3f} | {v['kendall']:.3f} | "
            f"{100 * v['top1_percentile']:.1f} | "
            + " | ".join(f"{v['regret'][k]['regret']:.2f}" for k in ks)
            + f" | {'-' if rel is None else f'{100 * rel:.1f}%'} | {v['fine_cer']:.2f} | "
            f"{v['total_seconds']:.1f} |"
        )
    return "\n".join(lines)
