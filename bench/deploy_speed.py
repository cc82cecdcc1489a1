#!/usr/bin/env python3
"""Benchmark: decoding speed and CER where the models are deployed: torch, onnxruntime and
sherpa-onnx, float32 and int8.

Each --model NAME=DIR (a comflp model directory; the first is the reference, normally the
unpruned model) is exported with comflp.export (model.onnx and model.int8.onnx) into
--export_dir/NAME, unless that directory already holds an export of the same model. The test
set's waveforms are loaded into memory once; each runtime then decodes them one utterance at a
time, waveform to text, as a service would, with greedy CTC:

- torch: comflp's model (lhotse fbank, global CMVN, greedy search); int8 is torch's dynamic
  quantisation of every nn.Linear (torch.ao.quantization.quantize_dynamic);
- onnxruntime: model.onnx or model.int8.onnx (lhotse fbank, greedy search in numpy);
- sherpa-onnx: its offline recogniser on the export directory (its own fbank and greedy search).

For each thread count (torch threads, onnxruntime intra-op threads, sherpa-onnx num_threads):
warm-up on --warmup utterances, then --repeats passes over the whole set; RTF = median pass
time / audio seconds; the ratio is to the reference model's float32 torch RTF at the same thread
count; CER of the first pass. The front-end share is the time spent computing features: the
lhotse fbank for torch and onnxruntime, accepting the waveform into a stream (where sherpa-onnx
computes its own fbank) for sherpa-onnx. A model that computes nothing (every frame blank) in
sherpa-onnx gives sherpa-onnx's whole own share (fbank, stream, search), a row per thread count.
Run it on a quiet machine (nothing else running).

    python bench/deploy_speed.py --workdir /work/runs --model unpruned=exp/baseline \\
        --model 12to6=exp/baseline/search/comflp_residual_sum_prune6/pruned \\
        --export_dir exp/deploy --output exp/deploy/deploy_speed.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
import sherpa_onnx
import torch
from common import emit

from comflp.adapters.native import NativeModel
from comflp.asr.ctc import ctc_greedy_search
from comflp.asr.data import cut_text, load_cuts
from comflp.asr.scoring import error_stats
from comflp.cli import UsageError, add_common_args, run
from comflp.export import export_model
from comflp.export.core import EXPORT_INFO, FLOAT_MODEL, INT8_MODEL
from comflp.export.graph import save_with_metadata, to_onnx
from comflp.export.native import INPUT_NAMES, OUTPUT_NAMES
from comflp.export.runtime import TOKENS, OrtCtc, SherpaCtc, normalise
from comflp.report.provenance import provenance_lines

RUNTIMES = ("torch", "onnxruntime", "sherpa-onnx")
FRONT_END = "none (sherpa-onnx's own share)"


class BlankCtc(torch.nn.Module):
    """A model in the WeNet CTC convention that computes nothing: every frame is blank.
    sherpa-onnx's time on it is its own share: its fbank, stream, greedy search."""

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor):
        blank = torch.zeros_like(x[..., 0])
        return torch.stack([blank, blank - 100], -1), x_lens


def front_end_export(root: Path) -> Path:
    out = root / "front_end"
    out.mkdir(parents=True, exist_ok=True)
    frames = torch.export.Dim("frames", min=2, max=20000)
    inputs = (torch.randn(1, 50, 80), torch.tensor([50]))
    shapes = {"x": {1: frames}, "x_lens": None}
    proto = to_onnx(BlankCtc(), inputs, (INPUT_NAMES, OUTPUT_NAMES), shapes, 18, "blank model")
    save_with_metadata(proto, out / FLOAT_MODEL, {"vocab_size": 2, "subsampling_factor": 1})
    (out / TOKENS).write_text("<blk> 0\n. 1\n")
    (out / EXPORT_INFO).write_text(json.dumps({"model_dir": None, "models": [FLOAT_MODEL]}))
    return out


class TorchCtc:
    """comflp's model in torch, one utterance at a time: the same fbank as :class:`OrtCtc`."""

    def __init__(self, model_dir: Path, int8: bool):
        self.model = NativeModel.load(model_dir)
        self.asr = self.model.asr.eval()
        if int8:
            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():  # deprecated in favour of torchao, still working
                warnings.simplefilter("ignore")
                self.asr = quantize_dynamic(self.asr, {torch.nn.Linear}, dtype=torch.qint8)
        self.mean, self.std = self.model.cmvn
        from lhotse import Fbank, FbankConfig

        self.fbank = Fbank(FbankConfig(num_mel_bins=80))

    def features(self, samples: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(self.fbank.extract(samples, 16000)) - self.mean) / self.std

    @torch.inference_mode()
    def decode_features(self, feats: torch.Tensor) -> str:
        log_probs, lens = self.asr.ctc_log_probs(feats[None], torch.tensor([len(feats)]))
        return normalise(self.model.tokenizer.decode(ctc_greedy_search(log_probs, lens)[0]))


@dataclass
class Utterances:
    ids: list[str]
    samples: list[np.ndarray]
    refs: list[str]
    seconds: float = field(init=False)

    def __post_init__(self):
        self.seconds = sum(len(s) for s in self.samples) / 16000


def load_utterances(cuts_path: Path, workdir: Path) -> Utterances:
    """The set's waveforms in memory (manifests hold paths relative to where run.sh ran)."""
    here = Path.cwd()
    os.chdir(workdir)
    try:
        cuts = load_cuts(cuts_path)
        return Utterances(
            [c.id for c in cuts], [c.load_audio()[0] for c in cuts], [cut_text(c) for c in cuts]
        )
    finally:
        os.chdir(here)


def exported(name: str, model_dir: Path, export_root: Path) -> Path:
    """``export_root/name``: reused when it holds a float32 + int8 export of ``model_dir``."""
    out = export_root / name
    info_path = out / EXPORT_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["model_dir"] == str(model_dir.resolve()) and INT8_MODEL in info["models"]:
            return out
    return export_model(model_dir, out, int8=True).out_dir


def make_runner(runtime: str, model_dir: Path, export_dir: Path, int8: bool, threads: int):
    torch.set_num_threads(threads)
    if runtime == "torch":
        return TorchCtc(model_dir, int8)
    if runtime == "onnxruntime":
        return OrtCtc(export_dir, threads, int8)
    return SherpaCtc(export_dir, threads, int8)


def one_pass(runner, samples: list[np.ndarray]) -> tuple[float, float, list[str]]:
    """(seconds, of which fbank seconds, transcripts) of one pass over ``samples``."""
    gc.collect()
    total = fbank = 0.0
    hyps = []
    split = hasattr(runner, "features")
    for s in samples:
        start = time.perf_counter()
        if split:
            feats = runner.features(s)
            fbank += time.perf_counter() - start
            hyps.append(runner.decode_features(feats))
        else:
            hyps.append(runner.transcribe(s))
        total += time.perf_counter() - start
    return total, fbank, hyps


def measure(runner, utts: Utterances, args: argparse.Namespace) -> dict:
    one_pass(runner, utts.samples[: args.warmup])
    passes = [one_pass(runner, utts.samples) for _ in range(args.repeats)]
    seconds = statistics.median(p[0] for p in passes)
    fbank = statistics.median(p[1] for p in passes)
    return {
        "rtf": seconds / utts.seconds,
        "fbank_share": fbank / seconds if fbank else None,
        "cer": error_stats(utts.refs, passes[0][2], "char").err,
    }


def rows_for(models: dict[str, Path], exports: dict[str, Path], utts, args) -> list[dict]:
    """One row per thread count, model, runtime and precision."""
    rows = []
    for threads in (int(n) for n in args.threads.split()):
        reference = None
        for name, model_dir in models.items():
            for runtime in RUNTIMES:
                for int8 in (False, True):
                    runner = make_runner(runtime, model_dir, exports[name], int8, threads)
                    row = measure(runner, utts, args)
                    del runner
                    reference = reference or row["rtf"]
                    row.update(model=name, runtime=runtime, int8=int8, threads=threads)
                    row["ratio"] = row["rtf"] / reference
                    rows.append(row)
        row = measure(SherpaCtc(exports[FRONT_END], threads), utts, args)
        row.update(model=FRONT_END, runtime="sherpa-onnx", int8=False, threads=threads, cer=None)
        rows.append({**row, "ratio": row["rtf"] / reference})
    return rows


def describe(models: dict[str, Path]) -> dict[str, str]:
    """Per model: its layers (kept layer numbers, or 'structured') and parameter count."""
    out = {FRONT_END: "- | -"}
    for name, model_dir in models.items():
        model = NativeModel.load(model_dir)
        cfg = model.asr.cfg
        layers = f"{cfg.num_layers}" + (" (structured)" if cfg.layer_shapes else "")
        out[name] = f"{layers} | {model.num_parameters():,}"
    return out


def markdown(rows: list[dict], models: dict[str, Path], notes: list[str]) -> str:
    sizes = describe(models)
    float_cer = {(r["model"], r["runtime"], r["threads"]): r["cer"] for r in rows if not r["int8"]}
    lines = [
        *notes,
        "",
        "| model | layers | params | runtime | precision | threads | RTF | vs unpruned torch "
        "float32 | front-end share | test CER % | int8 - float32 CER |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        share = "-" if r["fbank_share"] is None else f"{100 * r['fbank_share']:.0f}%"
        delta = "-"
        if r["int8"]:
            delta = f"{r['cer'] - float_cer[(r['model'], r['runtime'], r['threads'])]:+.2f}"
        cer = "-" if r["cer"] is None else f"{r['cer']:.2f}"
        lines.append(
            f"| {r['model']} | {sizes[r['model']]} | {r['runtime']} | "
            f"{'int8' if r['int8'] else 'float32'} | {r['threads']} | {r['rtf']:.4f} | "
            f"{r['ratio']:.2f}x | {share} | {cer} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def parse_models(items: list[str], workdir: Path) -> dict[str, Path]:
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--model {item}: expected NAME=DIR, e.g. unpruned=exp/baseline")
        models[name] = workdir / path
        if not (models[name] / "config.yaml").is_file():
            raise UsageError(f"--model {item}: {models[name]} is not a comflp model directory")
    if not models:
        raise UsageError("give at least one --model NAME=DIR")
    return models


def main(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 1:
        raise UsageError("--repeats and --warmup must be >= 1")
    models = parse_models(args.model, args.workdir)
    exports = {name: exported(name, path, args.export_dir) for name, path in models.items()}
    exports[FRONT_END] = front_end_export(args.export_dir)
    cuts = args.cuts or Path(f"data/fbank/cuts_{args.test_set}.jsonl.gz")
    utts = load_utterances(cuts, args.workdir)
    load_before = os.getloadavg()[0]
    rows = rows_for(models, exports, utts, args)
    notes = [
        f"{len(utts.ids)} utterances of {cuts} ({utts.seconds:.1f} s of audio), decoded one at a "
        f"time from the waveform in memory to text, greedy CTC; warm-up on {args.warmup} "
        f"utterances, then the median of {args.repeats} passes over the set. Load average "
        f"(1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.",
        f"Models: {', '.join(f'{n} = {p}' for n, p in models.items())}; exports in "
        f"{args.export_dir}.",
        f"onnxruntime {onnxruntime.__version__}; sherpa-onnx "
        f"{sherpa_onnx.__version__} (its bundled onnxruntime "
        f"{sherpa_onnx.lib._sherpa_onnx.onnxruntime_version}).",
        *provenance_lines(""),
    ]
    emit(markdown(rows, models, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME=DIR", help="a model (repeat)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where run.sh ran")
    parser.add_argument("--test_set", default="test-clean")
    parser.add_argument("--cuts", type=Path, help="cuts to decode (default: the test set's)")
    parser.add_argument("--export_dir", type=Path, default=Path("exp/deploy"))
    parser.add_argument("--threads", default="1 2", help="thread counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20, help="utterances decoded first")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)
