#!/usr/bin/env python3
"""Diagnosis: are the features sherpa-onnx hands an exported model the features comflp trains on?

sherpa-onnx computes the fbank itself and passes it to the model; nothing in its API returns it.
This script exports a probe in the same WeNet CTC convention whose "log-probabilities" spell
every feature value in decimal digits (one digit token per frame, blanks between), so that
sherpa-onnx's own greedy search writes the features out as text. They are compared, on the
scale the exported graph works on (16-bit samples, energies floored as the graph floors them),
with lhotse's fbank (comflp's), over speech (lhotse above its floor) and digital silence (lhotse
on its floor); with lhotse's fbank of the samples plus Gaussian noise of one 16-bit step (what
sherpa-onnx's dither would add); and with sherpa-onnx's own second pass over the same audio
(dither makes it random).

    python bench/sherpa_fbank.py --workdir /work/runs --num_utts 20 --output exp/bench/sherpa_fbank.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import sherpa_onnx
import torch
from common import emit
from deploy_speed import load_utterances

from comflp.cli import add_common_args, run
from comflp.export.graph import save_with_metadata, to_onnx
from comflp.export.native import LOG_FLOOR, LOG_INT16_POWER, NUM_MEL_BINS, SAMPLE_RATE
from comflp.export.runtime import TOKENS

OFFSET, SCALE, DIGITS = 60.0, 10_000, 7  # value -> round((value + 60) * 1e4): 7 digits
LOUD = 10.0  # log-mel energy (16-bit scale) far above what one 16-bit step of noise gives


class Probe(torch.nn.Module):
    """Features (1, T, 80) -> one-hot "log-probabilities" of their decimal digits."""

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor):
        k = torch.round((x[0] + OFFSET) * SCALE).long().clamp(0, 10**DIGITS - 1)
        digits = torch.stack([(k // 10**p) % 10 for p in range(DIGITS - 1, -1, -1)], -1) + 1
        ids = torch.stack([digits.reshape(-1), torch.zeros_like(digits.reshape(-1))], -1)
        scores = torch.nn.functional.one_hot(ids.reshape(1, -1), 11).float() * 100 - 100
        return scores, torch.full((1,), scores.size(1), dtype=torch.long)


def probe_recognizer(directory: Path):
    frames = torch.export.Dim("frames", min=2, max=20000)
    inputs = (torch.randn(1, 50, NUM_MEL_BINS), torch.tensor([50]))
    shapes = {"x": {1: frames}, "x_lens": None}
    proto = to_onnx(Probe(), inputs, (("x", "x_lens"), ("digits", "len")), shapes, 18, "probe")
    save_with_metadata(proto, directory / "model.onnx", {"vocab_size": 11, "subsampling_factor": 1})
    (directory / TOKENS).write_text("<blk> 0\n" + "".join(f"{d} {d + 1}\n" for d in range(10)))
    return sherpa_onnx.OfflineRecognizer.from_wenet_ctc(
        model=str(directory / "model.onnx"), tokens=str(directory / TOKENS)
    )


def sherpa_features(recognizer, samples: np.ndarray) -> np.ndarray:
    stream = recognizer.create_stream()
    stream.accept_waveform(SAMPLE_RATE, samples)
    recognizer.decode_stream(stream)
    digits = np.array([int(t) for t in stream.result.tokens]).reshape(-1, DIGITS)
    values = digits @ (10 ** np.arange(DIGITS - 1, -1, -1)) / SCALE - OFFSET
    return values.reshape(-1, NUM_MEL_BINS)


def floored(feats: np.ndarray) -> np.ndarray:
    """On the graph's scale, floored as the graph floors (lhotse's floor)."""
    return np.maximum(feats, LOG_FLOOR + LOG_INT16_POWER)


def lhotse_features(fbank, samples: np.ndarray) -> np.ndarray:
    return floored(fbank.extract(samples, SAMPLE_RATE) + LOG_INT16_POWER)


def compare(args: argparse.Namespace) -> list[str]:
    from lhotse import Fbank, FbankConfig

    fbank = Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS))
    utts = load_utterances(Path(f"data/fbank/cuts_{args.test_set}.jsonl.gz"), args.workdir)
    rng = np.random.default_rng(0)
    diffs = {(who, part): [] for who in ("sherpa", "noise") for part in PARTS}
    diffs["again"], frames_equal = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        recognizer = probe_recognizer(Path(tmp))
        for samples in utts.samples[: args.num_utts]:
            ours = lhotse_features(fbank, samples)
            theirs = floored(sherpa_features(recognizer, samples))
            frames_equal += ours.shape == theirs.shape
            noise = rng.normal(0, 1 / 32768, len(samples)).astype(np.float32)
            noisy = lhotse_features(fbank, samples + noise)
            for part, mask in parts(ours).items():
                diffs["sherpa", part].append(np.abs(theirs - ours)[mask])
                diffs["noise", part].append(np.abs(noisy - ours)[mask])
            again = floored(sherpa_features(recognizer, samples))
            diffs["again"].append(np.abs(again - theirs).ravel())
    return table(diffs, frames_equal, args)


PARTS = {
    "silence": "digital silence (lhotse on its floor)",
    "quiet": f"quiet (floor < lhotse <= {LOUD:g})",
    "loud": f"loud (lhotse > {LOUD:g})",
}


def parts(ours: np.ndarray) -> dict[str, np.ndarray]:
    silence = ours <= LOG_FLOOR + LOG_INT16_POWER + 1e-4
    loud = ours > LOUD
    return {"silence": silence, "quiet": ~silence & ~loud, "loud": loud}


def table(diffs: dict, frames_equal: int, args: argparse.Namespace) -> list[str]:
    lines = [
        f"{args.num_utts} utterances of {args.test_set}; log-mel values on the exported graph's "
        f"scale (16-bit samples), floored as it floors them; {frames_equal}/{args.num_utts} "
        f"with the same number of frames; sherpa-onnx {sherpa_onnx.__version__}.",
        "",
        "| compared with lhotse's fbank | values | mean abs diff | 99th pct | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = {"sherpa": "sherpa-onnx", "noise": "lhotse + Gaussian noise of one 16-bit step"}
    rows = [(f"{labels[who]}, {PARTS[part]}", diffs[who, part]) for who in labels for part in PARTS]
    rows.append(("sherpa-onnx against its own second pass", diffs["again"]))
    for label, chunks in rows:
        d = np.concatenate(chunks)
        lines.append(
            f"| {label} | {d.size:,} | {d.mean():.5f} | {np.percentile(d, 99):.4f} | {d.max():.4f} |"
        )
    return lines


def main(args: argparse.Namespace) -> None:
    emit("\n".join(compare(args)) + "\n", args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where run.sh ran")
    parser.add_argument("--test_set", default="test-clean")
    parser.add_argument("--num_utts", type=int, default=20)
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)
