"""The search-quality study: how well each scoring variant ranks pruning proposals by the dev
CER of their pruned models (method: :mod:`comflp.quality.study`; report:
:mod:`comflp.quality.report`).

One forward pass dumps ``--calib_num_utts`` calibration utterances (frames pooling, at most
``--frames_per_utt`` frames each) into OUTPUT/dump; every variant (score, dc batch size,
pooling, calibration size N, block aggregation) is derived from it. The dev CER of every
proposal is cached in OUTPUT/cers_prune<P>.json, so a rerun evaluates nothing. Writes
OUTPUT/quality.json, OUTPUT/SEARCH_QUALITY.md and one scatter plot per P.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from comflp.adapters.base import ModelSettings, PrunableModel
from comflp.asr.data import (
    EVAL_MAX_DURATION,
    eval_loader,
    load_cuts,
    load_eval_batches,
    random_subset,
)
from comflp.errors import InputError
from comflp.expdir import DUMP_INFO, ExpDir
from comflp.prune.dump import FRAMES_PER_UTT, POOLINGS, dump_layers
from comflp.prune.scores.base import SCORES, ScoreChoice, is_composite, split_scores
from comflp.prune.searches.base import MergeChoice
from comflp.prune.stacks import LayerStack, stack_of
from comflp.quality.report import plot_scatter, report, robustness_report
from comflp.quality.robustness import across_models, calibration_shift, model_summary, variant_name
from comflp.quality.study import (
    CALIB_SIZES,
    REFERENCE_NUM_UTTS,
    CerCache,
    StudyFeatures,
    dev_settings,
    study_entries,
    study_num_prune,
    study_variants,
    variant_scores,
)
from comflp.report.provenance import written
from comflp.settings import REQUIRED, option
from comflp.subsets import parse_num_prune
from comflp.utils import atomic_write_json, atomic_write_text

QUALITY_JSON = "quality.json"
REPORT_MD = "SEARCH_QUALITY.md"
DUMP_DIR = "dump"


@dataclass(kw_only=True)
class QualitySettings(ModelSettings):
    """The study: the model, the P values, the scoring variants, the calibration and dev sets."""

    num_prune: list[str] = option(["2", "4", "6", "8"], "P values studied")
    output_dir: Path = option(REQUIRED, "the study's directory")
    scores: list[str] = option(
        ["dc", "svcca", "pwcca", "cka", "cosine", "angular", "change", "residual_sum"],
        "scores studied (the consensus of the defaults is added to every study)",
        choices=lambda: tuple(n for n in SCORES.names() if not is_composite(n)),
    )
    poolings: list[str] = option(list(POOLINGS), "poolings studied", choices=POOLINGS)
    calib_cuts: Path = option(
        Path("data/fbank/cuts_train-clean-100.jsonl.gz"), "cuts the calibration set is drawn from"
    )
    calib_num_utts: int = option(max(CALIB_SIZES), "calibration utterances dumped")
    calib_sizes: list[int] = option(
        list(CALIB_SIZES), "calibration sizes N compared (capped at the dumped utterances)"
    )
    calib_seed: int = option(0, "seed of the calibration subset (another one: another subset)")
    reference_num_utts: int = option(REFERENCE_NUM_UTTS, "the N the other sizes are compared with")
    dev_cuts: Path = option(Path("data/fbank/cuts_dev-clean.jsonl.gz"), "cuts of the dev set")
    dev_num_utts: int = option(320, "dev utterances the CERs are measured on")
    frames_per_utt: int = option(FRAMES_PER_UTT, "frames dumped per utterance (0: all)")
    frame_rows: int = option(8192, "frame pooling: rows kept at most")
    max_proposals: int = option(
        1000, "evaluate all C(L, P) proposals up to this many, else a sample"
    )
    sample_size: int = option(300, "uniform proposals of a sample")
    seed: int = option(0, "seed of the dev subset, the proposal sample and the frame rows")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per batch")


def calibration_dump(s: QualitySettings, model: PrunableModel, stack: LayerStack) -> Path:
    """The study's frame-pooled dump of the calibration subset (reused when it matches)."""
    dump_dir = s.output_dir / DUMP_DIR
    study = {
        "cuts": str(s.calib_cuts),
        "requested_utts": s.calib_num_utts,
        "frames_per_utt": s.frames_per_utt,
        "seed": s.calib_seed,
        "model_dir": str(model.source),
        "stack": stack.name,
    }
    info_path = dump_dir / DUMP_INFO
    if info_path.is_file() and json.loads(info_path.read_text()).get("study") == study:
        logging.info(f"{dump_dir}: reusing the study's dump")
        return dump_dir
    cuts = random_subset(load_cuts(s.calib_cuts), s.calib_num_utts, s.calib_seed)
    dump_layers(
        stack,
        eval_loader(cuts, model.dataset(), s.max_duration),
        dump_dir,
        pooling="frames",
        frames_per_utt=s.frames_per_utt,
        seed=s.calib_seed,
        extra_info={"study": study},
    )
    return dump_dir


def default_variants(variants: list, reference: int) -> list:
    """The variants of stage 5's default scores as stage 6 searches them (frames, N =
    reference, dc over batches of 32, mean aggregation); empty unless all are studied."""
    want = [variant_name(name, reference) for name in split_scores(ScoreChoice().scores)[0]]
    by_name = {v.name: v for v in variants}
    return [by_name[n] for n in want] if all(n in by_name for n in want) else []


def glp_reference(exp_dir: Path, stack: str, num_prune: int) -> dict | None:
    """Stage 6's GLP search of the experiment, when there is one: its seconds and CER."""
    path = ExpDir(exp_dir).stack(stack).search_result("glp", num_prune)
    if not path.is_file():
        return None
    glp = json.loads(path.read_text())
    if "skipped" in glp:
        return None
    return {"seconds": glp["seconds"], "cer": glp["best_metric"], "layers": glp["best_layers"]}


def reuse_oracle(cache: CerCache, exp_dir: Path, stack: str, num_prune: int) -> int:
    """Copy into ``cache`` the CERs stage 6's exhaustive oracle measured for this P, when it
    evaluated the same model on the same dev batches (the study's most expensive part, already
    paid); the number of proposals copied."""
    path = ExpDir(exp_dir).stack(stack).search_result("oracle", num_prune)
    if not path.is_file():
        return 0
    oracle = json.loads(path.read_text())
    want = cache.data["settings"]
    same = {
        "model_dir": oracle.get("model_dir"),
        "stack": oracle.get("stack"),
        "dev_cuts": oracle.get("dev_cuts"),
        "dev_num_utts": oracle.get("num_utts"),
        "seed": oracle.get("seed"),
        "max_duration": oracle.get("max_duration"),
        "batch_order": oracle.get("batch_order"),
    }
    if "skipped" in oracle or same != want:
        return 0
    cers = cache.data["cers"]
    fields = ("cer", "wer", "loss", "seconds")
    for row in oracle["candidates"]:
        cers.setdefault(cache.key(row["layers"]), {k: row[k] for k in fields})
    cache.save()
    return len(oracle["candidates"])


def _sizes(s: QualitySettings, available: int) -> tuple[list[int], int]:
    sizes = sorted({min(n, available) for n in s.calib_sizes})
    reference = min(s.reference_num_utts, available)
    if reference not in sizes:
        raise InputError(
            f"--reference_num_utts {s.reference_num_utts}: not among --calib_sizes {sizes}"
        )
    if max(s.calib_sizes) > available:
        logging.warning(f"only {available} calibration utterances: sizes capped to {sizes}")
    return sizes, reference


def study(s: QualitySettings) -> None:
    model = s.load_model()
    stack = stack_of(model, s.stack)
    nums = parse_num_prune(s.num_prune, stack.num_layers, f"the {stack.num_layers}-layer {s.stack}")
    s.output_dir.mkdir(parents=True, exist_ok=True)
    features = StudyFeatures(calibration_dump(s, model, stack), s.frame_rows, s.calib_seed)
    sizes, reference = _sizes(s, features.num_utts)
    variants = study_variants(s.scores, s.poolings, sizes, features.rows, reference)
    logging.info(f"{len(variants)} scoring variants")
    try:
        built = variant_scores(features, variants)
    except ValueError as e:
        raise InputError(f"scores of {s.output_dir / DUMP_DIR}: {e}") from None
    entries = study_entries(variants, built, default_variants(variants, reference))
    batches = load_eval_batches(model, s.dev_cuts, s.max_duration, s.dev_num_utts, s.seed)
    settings = dev_settings(s, str(model.source), stack.name)
    results = []
    for p in nums:
        cache = CerCache(s.output_dir / f"cers_prune{p}.json", settings)
        reused = reuse_oracle(cache, s.exp_dir, s.stack, p)
        if reused:
            logging.info(f"P={p}: {reused} proposal CERs taken from stage 6's oracle")
        result = study_num_prune(
            stack,
            batches,
            entries,
            p,
            cache,
            features.info["seconds"] / features.num_utts,
            s.max_proposals,
            s.sample_size,
            s.seed,
        )
        result["glp"] = glp_reference(s.exp_dir, s.stack, p)
        plot_scatter(result, s.output_dir / f"scatter_prune{p}.png")
        results.append(result)
        best = min(result["variants"], key=lambda v: v["spearman"])
        logging.info(
            f"P={p}: {result['num_proposals']} proposals, oracle CER {result['oracle_cer']:.2f}; "
            f"best Spearman {best['spearman']:.3f} ({best['name']})"
        )
    write_summary(s, settings, stack.num_layers, features, sizes, reference, results)


def write_summary(s, settings, num_layers, features, sizes, reference, results) -> None:
    summary = {
        **settings,
        "num_layers": num_layers,
        "frames_per_utt": s.frames_per_utt,
        "frame_rows": s.frame_rows,
        "reference": reference,
        "calibration": {
            "cuts": str(s.calib_cuts),
            "seed": s.calib_seed,
            "requested": s.calib_num_utts,
            "num_utts": features.num_utts,
            "asked_sizes": list(s.calib_sizes),
            "sizes": sizes,
            "capped": max(s.calib_sizes) > features.num_utts,
        },
        "results": results,
    }
    atomic_write_json(s.output_dir / QUALITY_JSON, summary)
    atomic_write_text(s.output_dir / REPORT_MD, report(summary))
    logging.info(f"wrote {s.output_dir / QUALITY_JSON} and {s.output_dir / REPORT_MD}")


@dataclass(kw_only=True)
class SummarySettings(ScoreChoice, MergeChoice):
    """The study across models: several studies' quality.json, one P."""

    studies: list[str] = option(REQUIRED, "LABEL=DIR: a model's study directory")
    calibration: list[str] = option(
        [], "LABEL=DIR: a second study of LABEL's model with another calibration subset"
    )
    num_prune: int = option(6, "the P compared (all its proposals evaluated in every study)")
    output: Path = option(REQUIRED, "the Markdown report (its JSON beside it)")


def labelled_dirs(items: list[str], option_name: str, file_name: str = QUALITY_JSON) -> dict:
    """LABEL=DIR items -> LABEL: DIR; one InputError line naming ``--option_name`` for an item
    whose DIR lacks ``file_name``."""
    out = {}
    for item in items:
        label, sep, directory = item.partition("=")
        if not sep or not (Path(directory) / file_name).is_file():
            raise InputError(f"--{option_name} {item}: expected LABEL=DIR with DIR/{file_name}")
        out[label] = Path(directory)
    return out


def labelled_studies(items: list[str], option_name: str) -> dict[str, dict]:
    """LABEL=DIR items -> LABEL: the study in DIR/quality.json."""
    dirs = labelled_dirs(items, option_name)
    return {label: json.loads((d / QUALITY_JSON).read_text()) for label, d in dirs.items()}


def summarize(s: SummarySettings) -> None:
    studies = labelled_studies(s.studies, "studies")
    again = labelled_studies(s.calibration, "calibration")
    unknown = sorted(set(again) - set(studies))
    if unknown:
        raise InputError(f"--calibration {', '.join(unknown)}: no study of that label")
    members, composites = split_scores(s.scores)
    try:
        models = {
            k: model_summary(
                v,
                s.num_prune,
                members,
                s.top_k,
                s.score_top_k,
                bool(composites),
                s.refine,
                s.fine_rules,
            )
            for k, v in studies.items()
        }
        shifts = {
            k: calibration_shift(studies[k], v, s.num_prune, members) for k, v in again.items()
        }
    except ValueError as e:
        raise InputError(str(e)) from None
    summary = {
        "written": written(),
        "num_prune": s.num_prune,
        "scores": members,
        "top_k": s.top_k,
        "score_top_k": s.score_top_k,
        "refine": s.refine,
        "fine_rules": list(s.fine_rules),
        "consensus": bool(composites),
        "models": models,
        "across": across_models(models),
        "calibration": shifts,
    }
    atomic_write_json(s.output.with_suffix(".json"), summary)
    atomic_write_text(s.output, robustness_report(summary))
    logging.info(f"wrote {s.output} and its JSON")
