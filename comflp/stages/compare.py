"""Stages 7-9 around decoding: the method lists (which layers each method removes), decoding
the eval sets with every listed model, scoring and the results table (RESULTS.md with its plots)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lhotse import CutSet

from comflp.adapters.base import (
    CTC_WEIGHT,
    DECODE_BEAM_SIZE,
    MODEL_TYPES,
    PrunableModel,
    load_prunable,
)
from comflp.asr.data import EVAL_MAX_DURATION, eval_loader, load_cuts, part_of
from comflp.asr.scoring import write_scores
from comflp.decoding import decode_set
from comflp.errors import InputError
from comflp.expdir import (
    CONFIG,
    DECODE_PART,
    ERROR_PLOT,
    METHOD_LISTS,
    RESULTS_JSON,
    TRADEOFF_PLOT,
    ExpDir,
)
from comflp.plots import plot_error_vs_prune, plot_tradeoff
from comflp.prune.method_list import Method, MethodList
from comflp.prune.methods import CompareSettings, list_methods
from comflp.prune.stacks import stack_of
from comflp.report.results import build_rows, methods_table, results_markdown
from comflp.settings import REQUIRED, option
from comflp.utils import atomic_write_json, atomic_write_text, resolve_device


def compare(s: CompareSettings) -> None:
    """Stage 7's method list (compare/methods.json); stage 8's rows whose search now chooses
    other layers are dropped from its list (stage 8 makes them again), the others kept."""
    exp = ExpDir(s.exp_dir)
    methods = list_methods(s)
    output = exp.compare / METHOD_LISTS["compare"]
    methods.save(output)
    drop_stale_finetuned(exp.compare / METHOD_LISTS["finetune"], methods)
    logging.info(
        f"{output}: {len(methods.methods)} entries, {len(methods.unique())} distinct models to decode"
    )


def drop_stale_finetuned(path: Path, searched: MethodList) -> None:
    """Rewrite stage 8's list at ``path`` without the rows whose search (``<search>+...``)
    chooses other layers in ``searched`` than the model was fine-tuned from."""
    if not path.is_file():
        return
    chosen = {(m.name, m.num_prune, m.stack): m.pruned for m in searched.methods}
    finetuned = MethodList.load(path)
    kept = MethodList(
        [
            m
            for m in finetuned.methods
            if chosen.get((m.name.split("+")[0], m.num_prune, m.stack)) == m.original_pruned
        ]
    )
    if len(kept.methods) < len(finetuned.methods):
        stale = [f"{m.name} P={m.num_prune}" for m in finetuned.methods if m not in kept.methods]
        logging.info(f"{path}: dropped {', '.join(stale)} (the search chose other layers)")
        kept.save(path)


@dataclass(kw_only=True)
class DecodeSettings:
    """Decoding sets with every distinct model of a method list (or one model), each model
    loaded once for all the sets."""

    exp_dir: Path | None = option(None, "decode the method list of this experiment")
    method_list: str = option("compare", "which list", choices=tuple(METHOD_LISTS))
    eval_sets: list[str] = option([], "with --exp_dir: the decoded sets' names, one per --cuts")
    model_dir: Path | None = option(None, "decode this one model instead")
    model_type: str = option("native", "its library", choices=lambda: MODEL_TYPES.names())
    prune_layers: list[int] = option([], "with --model_dir: encoder layers to remove first")
    output_dir: Path | None = option(None, "with --model_dir: where to write")
    cuts: list[Path] = option(REQUIRED, "the sets' cuts (with --model_dir: one)")
    part: int = option(1, "which part (1-based) of the job array")
    num_parts: int = option(1, "parts of the job array")
    decoding_method: str = option("ctc_greedy_search", "a method the model has (model.decode)")
    decode_beam_size: int = option(DECODE_BEAM_SIZE, "beam of the beam searches")
    ctc_weight: float = option(CTC_WEIGHT, "attention rescoring: CTC score weight")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per batch")
    device: str = option("auto", "auto | cpu | cuda[:N]")


def _methods_and_outputs(
    s: DecodeSettings,
) -> tuple[MethodList, list[tuple[Path, Callable[[str], Path]]]]:
    """The models to decode, and each set's cuts with where a model's decoding of it goes."""
    if s.exp_dir is not None:
        if len(s.eval_sets) != len(s.cuts):
            raise InputError(
                f"--exp_dir needs one --eval_sets name per --cuts file (got {len(s.eval_sets)} names "
                f"for {len(s.cuts)} files)"
            )
        exp = ExpDir(s.exp_dir)
        methods = MethodList.load(exp.compare / METHOD_LISTS[s.method_list])
        return methods, [
            (cuts, lambda key, name=name: exp.decoded(name, key))
            for name, cuts in zip(s.eval_sets, s.cuts, strict=True)
        ]
    if s.model_dir is None or s.output_dir is None:
        raise InputError(
            "give --exp_dir and --eval_sets (stage 7), or --model_dir and --output_dir"
        )
    if len(s.cuts) != 1:
        raise InputError(f"--model_dir decodes one set: got {len(s.cuts)} --cuts files")
    method = Method(
        "model", len(s.prune_layers), s.prune_layers, str(s.model_dir), model_type=s.model_type
    )
    return MethodList([method]), [(s.cuts[0], lambda key: s.output_dir / key)]


def decode(s: DecodeSettings) -> None:
    """compare/decode/<set>/<model key>/part<J>.json: per-utterance ref/hyp, time, audio."""
    methods, outputs = _methods_and_outputs(s)
    device = resolve_device(s.device)
    parts = []
    for path, output in outputs:
        cuts = load_cuts(path)
        if len(cuts) == 0:
            raise InputError(f"--cuts {path}: the set is empty")
        parts.append((part_of(cuts, s.part, s.num_parts), output))
    models = {}
    for key, method in methods.unique().items():
        source = (method.model_type, method.model_dir)
        if source not in models:
            models[source] = load_prunable(*source).to(device)
        model = models[source]
        try:
            pruned = stack_of(model, method.stack).prune(method.pruned) if method.pruned else model
        except ValueError as e:
            raise InputError(
                f"{method.name} (P={method.num_prune}) does not fit {method.model_dir}: {e}"
            ) from None
        for cuts, output in parts:
            _decode_part(s, key, method, pruned, cuts, output(key))


def _decode_part(
    s: DecodeSettings, key: str, method: Method, pruned: PrunableModel, cuts: CutSet, out_dir: Path
) -> None:
    """One model's decoding of this job's part of one set, written to ``out_dir``."""
    loader = eval_loader(cuts, pruned.dataset(), s.max_duration)
    try:
        result = decode_set(pruned, loader, s.decoding_method, s.decode_beam_size, s.ctc_weight)
    except ValueError as e:
        raise InputError(f"--decoding_method {s.decoding_method}: {e}") from None
    atomic_write_json(
        out_dir / DECODE_PART.format(part=s.part),
        {
            "part": s.part,
            "num_parts": s.num_parts,
            "key": key,
            "model_type": method.model_type,
            "model_dir": method.model_dir,
            "stack": method.stack,
            "pruned": method.pruned,
            "params": pruned.num_parameters(),
            "decoding_method": s.decoding_method,
            "beam_size": s.decode_beam_size,
            **result.timing(),
            "utts": result.utts,
        },
    )
    logging.info(f"{out_dir}: {len(result.utts)} utterances, RTF {result.rtf:.4f}")


@dataclass(kw_only=True)
class ResultsSettings:
    """Scoring every decoded model and writing RESULTS.md."""

    exp_dir: Path = option(REQUIRED, "the experiment")
    eval_sets: list[str] = option(REQUIRED, "set names, as decoded")
    rtf_set: str | None = option(None, "set whose decoding gives the RTF (default: the last)")
    score_metrics: list[str] = option(
        ["wer", "cer"], "error rates in the table", choices=("wer", "cer")
    )
    command: str = option("", "the command line that produced these results")


def merge_parts(key_dir: Path) -> dict:
    """All parts of one decoding, checked for completeness, utterances in part order."""
    parts = sorted(key_dir.glob(DECODE_PART.format(part="*")), key=lambda p: int(p.stem[4:]))
    if not parts:
        raise InputError(f"{key_dir}: no decoding results (run stage 7's decoding step)")
    loaded = [json.loads(p.read_text()) for p in parts]
    expected = loaded[0]["num_parts"]
    have = sorted(d["part"] for d in loaded)
    if have != list(range(1, expected + 1)) or any(d["num_parts"] != expected for d in loaded):
        raise InputError(
            f"{key_dir}: parts {have} found, expected 1..{expected} of one decoding run"
        )
    merged = {k: loaded[0][k] for k in ("key", "params", "decoding_method")}
    merged["utts"] = [u for d in loaded for u in d["utts"]]
    merged["audio_seconds"] = sum(d["audio_seconds"] for d in loaded)
    merged["decode_seconds"] = sum(d["decode_seconds"] for d in loaded)
    return merged


def score_all(exp: ExpDir, methods: MethodList, sets: list[str], rtf_set: str):
    """Scores per model key and set, parameters and RTF per key, and the decoding method."""
    scores, params, rtf = {}, {}, {}
    decoding_method = None
    for key in methods.unique():
        scores[key] = {}
        for name in sets:
            merged = merge_parts(exp.decoded(name, key))
            decoding_method = merged["decoding_method"]
            timing = {
                "audio_seconds": merged["audio_seconds"],
                "decode_seconds": merged["decode_seconds"],
                "rtf": merged["decode_seconds"] / max(merged["audio_seconds"], 1e-9),
            }
            stats = write_scores(exp.decoded(name, key), f"{name} {key}", merged["utts"], timing)
            scores[key][name] = {"wer": stats["wer"].err, "cer": stats["cer"].err}
            params[key] = merged["params"]
            if name == rtf_set:
                rtf[key] = timing["rtf"]
    return scores, params, rtf, decoding_method


def results(s: ResultsSettings) -> None:
    """RESULTS.md, compare/results.json and compare/error_vs_prune.png from every method list."""
    exp = ExpDir(s.exp_dir)
    lists = [exp.compare / name for name in METHOD_LISTS.values()]
    methods = MethodList.load(*(p for p in lists if p.is_file() or p == lists[0]))
    rtf_set = s.rtf_set or s.eval_sets[-1]
    scores, params, rtf, decoding_method = score_all(exp, methods, s.eval_sets, rtf_set)
    rows = build_rows(methods, scores, params, rtf)
    metrics = tuple(s.score_metrics)
    table = methods_table(rows, s.eval_sets, metrics)
    plot_error_vs_prune(rows, s.eval_sets[-1], exp.compare / ERROR_PLOT, metrics)
    plot_tradeoff(rows, s.eval_sets, exp.compare / TRADEOFF_PLOT, metrics[-1])
    plots = {
        "test error against the number of pruned layers": exp.compare / ERROR_PLOT,
        "error against parameters and decoding RTF": exp.compare / TRADEOFF_PLOT,
    }
    atomic_write_json(
        exp.compare / RESULTS_JSON,
        {"rows": [r.__dict__ for r in rows], "sets": s.eval_sets, "rtf_set": rtf_set},
    )
    config_path = exp.root / CONFIG
    config = config_path.read_text() if config_path.is_file() else "(model trained elsewhere)\n"
    doc = results_markdown(exp.root, table, plots, config, s.command, decoding_method, rtf_set)
    atomic_write_text(exp.results_md, doc)
    print(table)
    logging.info(f"wrote {exp.results_md}")
