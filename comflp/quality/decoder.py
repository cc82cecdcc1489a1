"""Decoder scores that look at decoding (docs/SEARCH_QUALITY.md, "Decoder stacks").

On a decoder stack the dump's states come from teacher forcing on the references, while a
pruned decoder fails where it decodes on its own (it repeats, or stops early). Three measures
per proposal, each from a few calibration utterances and the model itself, are ranked against
the dev CER of real greedy decoding over every proposal (:func:`proposal_cers`, the study's
cache):

- ``kl_reference``: KL(full || pruned) of the next-token distributions, teacher-forced on the
  references, averaged over the predicted positions;
- ``kl_hypothesis``: the same, teacher-forced on the full decoder's own greedy hypotheses (no
  transcripts needed; the position where the full decoder stops included);
- ``short_decode``: the pruned decoder decodes greedily, each utterance capped at the full
  decoder's hypothesis length plus ``--margin`` tokens, scored by its CER against the full
  decoder's hypotheses (label-free; a repeating decoder runs into the cap).

Lower is better for all three: the study ranks by minus the measure, as a score would.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from comflp.adapters.base import IGNORE, DecoderModel, Hidden, ModelSettings
from comflp.asr.data import EVAL_MAX_DURATION, load_eval_batches
from comflp.asr.scoring import error_stats
from comflp.errors import InputError
from comflp.prune.ranks import spearman
from comflp.prune.scores.base import ScoreChoice, split_scores
from comflp.prune.stacks import stack_of
from comflp.quality.robustness import model_summary, study_consensus_label
from comflp.quality.stage import QUALITY_JSON, labelled_dirs
from comflp.quality.study import CerCache, dev_settings, proposal_cers
from comflp.report.provenance import written, written_lines
from comflp.settings import REQUIRED, option
from comflp.subsets import kept_layers, parse_num_prune
from comflp.utils import atomic_write_json, atomic_write_text

FORCED = ("kl_reference", "kl_hypothesis")
MEASURES = (*FORCED, "short_decode")
SCORES_JSON = "decoder_scores.json"
Forcing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, lengths


@dataclass(kw_only=True)
class DecoderStudySettings(ModelSettings):
    """The decoder study: the model, the P values, the calibration and dev sets."""

    output_dir: Path = option(REQUIRED, "the study's directory")
    num_prune: list[str] = option(["2"], "P values studied (every C(L, P) proposal)")
    calib_cuts: Path = option(
        Path("data/fbank/cuts_train-clean-100.jsonl.gz"), "cuts the calibration set is drawn from"
    )
    calib_num_utts: int = option(32, "calibration utterances the measures read", low=1)
    calib_seed: int = option(0, "seed of the calibration subset")
    margin: int = option(10, "short_decode: tokens allowed past the full hypothesis", low=0)
    dev_cuts: Path = option(Path("data/fbank/cuts_dev-clean.jsonl.gz"), "cuts of the dev set")
    dev_num_utts: int = option(320, "dev utterances the CERs are measured on")
    seed: int = option(0, "seed of the dev subset")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per batch")


@dataclass
class FullDecoder:
    """What the full decoder gives for one calibration batch: its memory, its greedy
    hypotheses (and their texts), and per teacher forcing the inputs and its log-probabilities."""

    memory: Hidden
    hypotheses: list[list[int]]
    texts: list[str]
    forced: dict[str, tuple[Forcing, torch.Tensor]]


def _forcing_on(model: DecoderModel, hyps: list[list[int]]) -> Forcing:
    """Teacher forcing on token sequences other than the references."""
    rows = [torch.tensor(h, dtype=torch.long) for h in hyps]
    width = max((len(h) for h in hyps), default=0)
    targets = torch.full((len(hyps), width), model.eos_id, dtype=torch.long)
    for i, row in enumerate(rows):
        targets[i, : len(row)] = row
    lens = torch.tensor([len(h) for h in hyps], dtype=torch.long)
    return model.teacher_forcing({"targets": targets, "target_lens": lens})


def _log_probs(model: DecoderModel, memory: Hidden, forcing: Forcing, layers: list[int]):
    inputs, _, lengths = forcing
    h = model.decoder_embed(memory, inputs, lengths)
    return model.decoder_readout(model.decoder_forward_layers(h, layers)).float()


@torch.no_grad()
def full_decoder(model: DecoderModel, batches: list[dict]) -> list[FullDecoder]:
    every = list(range(1, model.num_decoder_layers + 1))
    out = []
    for batch in batches:
        memory = model.encode(batch)
        hyps = model.greedy_decode(memory)
        forcings = {
            "kl_reference": model.teacher_forcing(batch),
            "kl_hypothesis": _forcing_on(model, hyps),
        }
        forced = {k: (f, _log_probs(model, memory, f, every)) for k, f in forcings.items()}
        out.append(FullDecoder(memory, hyps, [model.decode_ids(h) for h in hyps], forced))
    return out


@torch.no_grad()
def measure(model: DecoderModel, full: list[FullDecoder], layers: list[int], margin: int) -> dict:
    """The three measures of the decoder that keeps ``layers`` (1-indexed)."""
    sums = dict.fromkeys(FORCED, 0.0)
    counts = dict.fromkeys(FORCED, 0)
    wanted, got = [], []
    for f in full:
        for name, (forcing, reference) in f.forced.items():
            pruned = _log_probs(model, f.memory, forcing, layers)
            mask = forcing[1] != IGNORE
            sums[name] += float((reference.exp() * (reference - pruned)).sum(-1)[mask].sum())
            counts[name] += int(mask.sum())
        cap = torch.tensor([len(h) + margin + 1 for h in f.hypotheses])
        short = model.greedy_decode(f.memory, layers, max_tokens=cap)
        wanted += f.texts
        got += [model.decode_ids(h) for h in short]
    out = {name: sums[name] / max(counts[name], 1) for name in FORCED}
    out["short_decode"] = error_stats(wanted, got, "char").err
    return out


def ranking_quality(values: np.ndarray, cer: np.ndarray) -> dict:
    """How minus ``values`` ranks the proposals against their CER: Spearman (negative is
    good), the CER of its top 1, and the rank (1: first) of the oracle's proposal in it."""
    order = np.argsort(values, kind="stable")
    return {
        "spearman": spearman(-values, cer),
        "top1_cer": float(cer[order[0]]),
        "oracle_rank": int(np.flatnonzero(cer[order] == cer.min())[0]) + 1,
    }


def decoder_study(s: DecoderStudySettings) -> None:
    if s.stack != "decoder":
        raise InputError(f"--stack {s.stack}: the decoder study needs --stack decoder")
    model = s.load_model()
    stack = stack_of(model, "decoder")  # InputError for a model without one
    nums = parse_num_prune(s.num_prune, stack.num_layers, f"the {stack.num_layers}-layer decoder")
    s.output_dir.mkdir(parents=True, exist_ok=True)
    calib = load_eval_batches(model, s.calib_cuts, s.max_duration, s.calib_num_utts, s.calib_seed)
    dev = load_eval_batches(model, s.dev_cuts, s.max_duration, s.dev_num_utts, s.seed)
    start = time.perf_counter()
    full = full_decoder(model, calib)
    full_seconds = time.perf_counter() - start
    settings = dev_settings(s, str(model.source), "decoder")
    results = []
    for p in nums:
        proposals = list(combinations(range(1, stack.num_layers + 1), p))
        cache = CerCache(s.output_dir / f"cers_prune{p}.json", settings)
        cer = proposal_cers(stack, dev, proposals, cache)
        rows = []
        for layers in proposals:
            t = time.perf_counter()
            kept = list(kept_layers(stack.num_layers, layers))
            rows.append(
                {"layers": list(layers), "cer": float(cer[len(rows)])}
                | measure(model, full, kept, s.margin)
                | {"seconds": time.perf_counter() - t}
            )
        quality = {m: ranking_quality(np.array([r[m] for r in rows]), cer) for m in MEASURES}
        quality["teacher_forced_nll"] = ranking_quality(
            np.array([cache.data["cers"][cache.key(x)]["loss"] for x in proposals]), cer
        )
        results.append(
            {"num_prune": p, "oracle_cer": float(cer.min()), "rows": rows, "quality": quality}
        )
        logging.info(f"P={p}: {len(proposals)} proposals, oracle CER {cer.min():.2f}")
    summary = {
        "written": written(),
        **settings,
        "num_layers": stack.num_layers,
        "calib_cuts": str(s.calib_cuts),
        "calib_num_utts": sum(len(f.hypotheses) for f in full),
        "margin": s.margin,
        "full_decoder_seconds": full_seconds,
        "results": results,
    }
    atomic_write_json(s.output_dir / SCORES_JSON, summary)
    atomic_write_text(s.output_dir / "DECODER_SCORES.md", report(summary))
    logging.info(f"wrote {s.output_dir / 'DECODER_SCORES.md'}")


def report(summary: dict) -> str:
    lines = [
        "# Decoder scores against the dev CER of greedy decoding",
        *written_lines(summary["written"]),
        "",
        f"Model: {summary['model_dir']} ({summary['num_layers']} decoder layers). Dev: "
        f"{summary['dev_num_utts']} utterances of {summary['dev_cuts']} (at most). Measures from "
        f"{summary['calib_num_utts']} calibration utterances of {summary['calib_cuts']} "
        f"(short_decode: cap at the full hypothesis + {summary['margin']} tokens); "
        "teacher_forced_nll: the dev set's own teacher-forced loss, for comparison.",
    ]
    for r in summary["results"]:
        seconds = sum(row["seconds"] for row in r["rows"])
        lines += [
            "",
            f"## P = {r['num_prune']}",
            "",
            f"{len(r['rows'])} proposals; oracle CER {r['oracle_cer']:.2f}; the measures of all "
            f"of them took {seconds:.1f} s (the full decoder's pass "
            f"{summary['full_decoder_seconds']:.1f} s).",
            "",
            "| measure | Spearman | CER of its top 1 | the oracle's rank in it |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, q in r["quality"].items():
            lines.append(
                f"| {name} | {q['spearman']:.3f} | {q['top1_cer']:.2f} | {q['oracle_rank']} |"
            )
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class DecoderSummarySettings:
    """The decoder measures across models, each at P = half its decoder's layers."""

    studies: list[str] = option(
        REQUIRED,
        f"LABEL=DIR: a model's decoder study (DIR/{SCORES_JSON}; with DIR/{QUALITY_JSON}, the "
        "search-quality study of the same P, the default scores and pipeline too)",
    )
    output: Path = option(REQUIRED, "the Markdown report (its JSON beside it)")


def decoder_model_summary(label: str, study: dict, quality: dict | None) -> dict:
    """One model at P = half its layers: each measure's ranking quality and, from its
    search-quality study, the default consensus's and the default pipeline's."""
    num_prune = study["num_layers"] // 2
    result = next((r for r in study["results"] if r["num_prune"] == num_prune), None)
    if result is None:
        raise InputError(
            f"--studies {label}: no P = {num_prune} (half of its {study['num_layers']} decoder "
            f"layers) in its {SCORES_JSON}"
        )
    row = {
        "model": study["model_dir"],
        "num_layers": study["num_layers"],
        "num_prune": num_prune,
        "proposals": len(result["rows"]),
        "oracle_cer": result["oracle_cer"],
        "measures": result["quality"],
    }
    if quality is not None:
        members = split_scores(ScoreChoice().scores)[0]
        try:
            default = model_summary(quality, num_prune, members)
        except ValueError as e:
            raise InputError(f"--studies {label}: {e}") from None
        name = study_consensus_label(members)  # as the encoder stacks' summary reports it
        row["consensus"] = {"name": name, **default["scores"][name]}
        row["pipeline"] = default["pipeline"]
    return row


def summarize_decoders(s: DecoderSummarySettings) -> None:
    models = {}
    for label, directory in labelled_dirs(s.studies, "studies", SCORES_JSON).items():
        study = json.loads((directory / SCORES_JSON).read_text())
        beside = directory / QUALITY_JSON
        quality = json.loads(beside.read_text()) if beside.is_file() else None
        models[label] = decoder_model_summary(label, study, quality)
    columns = [*MEASURES, "teacher_forced_nll"]
    median = {
        m: float(np.median([r["measures"][m]["spearman"] for r in models.values()]))
        for m in columns
    }
    with_default = [r for r in models.values() if "consensus" in r]
    if with_default:
        median["consensus"] = float(np.median([r["consensus"]["spearman"] for r in with_default]))
    summary = {"written": written(), "models": models, "median_spearman": median}
    atomic_write_json(s.output.with_suffix(".json"), summary)
    atomic_write_text(s.output, summary_report(summary, columns))
    logging.info(f"wrote {s.output} and its JSON")


def summary_report(summary: dict, columns: list[str]) -> str:
    models, median = summary["models"], summary["median_spearman"]
    default = "consensus" in median
    head = [*columns, *(["consensus (default)"] if default else [])]
    lines = [
        "# Decoder measures across models (P = half the decoder's layers)",
        *written_lines(summary["written"]),
        "",
        "Spearman of each measure (ranked as minus the measure) against the dev CER of greedy "
        "decoding over every proposal; negative is good. In brackets: the rank of the oracle's "
        "proposal in that measure's ranking.",
        "",
        f"| model | layers | P | proposals | oracle CER | {' | '.join(head)} |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(head),
    ]
    for label, r in models.items():
        cells = [
            f"{r['measures'][m]['spearman']:.3f} ({r['measures'][m]['oracle_rank']})"
            for m in columns
        ]
        if default:
            cells.append(f"{r['consensus']['spearman']:.3f}" if "consensus" in r else "")
        lines.append(
            f"| {label} | {r['num_layers']} | {r['num_prune']} | {r['proposals']} | "
            f"{r['oracle_cer']:.2f} | {' | '.join(cells)} |"
        )
    lines.append(
        "| median | | | | | "
        + " | ".join(f"{median[m]:.3f}" for m in [*columns, *(["consensus"] if default else [])])
        + " |"
    )
    if default:
        lines += [
            "",
            "The default scores on each model's search-quality study (its stage-4 dump, "
            "teacher-forced): the consensus's top 10 and the default pipeline's choice (the "
            "fine search of the consensus's top 10 and each score's first, then --refine).",
            "",
            "| model | consensus top 10 above the oracle | pipeline CER | oracle CER | pipeline above the oracle | evaluations |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, r in models.items():
            if "consensus" not in r:
                continue
            p = r["pipeline"]
            lines.append(
                f"| {label} | {100 * r['consensus']['relative@10']:.1f}% | {p['cer']:.2f} | "
                f"{r['oracle_cer']:.2f} | {100 * p['relative']:.1f}% | {p['evaluations']} |"
            )
    return "\n".join(lines) + "\n"
