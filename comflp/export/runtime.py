"""Decoding an exported comflp model where it is deployed: onnxruntime and sherpa-onnx.

Both take a waveform (float32 samples in [-1, 1] at 16 kHz) and return text, one utterance at a
time, as a service would. :class:`OrtCtc` computes the fbank with lhotse (what comflp trains
on) and runs ``model.onnx`` with greedy CTC; :class:`SherpaCtc` hands the samples to sherpa-onnx's
offline recogniser, which computes the fbank itself (kaldi-native-fbank) and searches greedily.
Token ids become text as sherpa-onnx makes it: pieces joined, ``▁`` read as a space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comflp.export.core import EXPORT_INFO, FLOAT_MODEL, INT8_MODEL
from comflp.export.graph import ExportError, ort_session
from comflp.export.native import LOG_INT16_POWER, NUM_MEL_BINS, SAMPLE_RATE

TOKENS = "tokens.txt"


def model_file(export_dir: Path, int8: bool) -> Path:
    """``model.onnx`` or ``model.int8.onnx`` of an export directory (ExportError if absent)."""
    path = Path(export_dir) / (INT8_MODEL if int8 else FLOAT_MODEL)
    if not (Path(export_dir) / EXPORT_INFO).is_file() or not path.is_file():
        raise ExportError(f"{path}: not found (export with bin/export.py{' --int8 true' * int8})")
    return path


def read_tokens(path: Path) -> list[str]:
    """Pieces by id from a ``piece id`` file."""
    pieces = {}
    for line in Path(path).read_text().splitlines():
        piece, index = line.rsplit(maxsplit=1)
        pieces[int(index)] = piece
    return [pieces[i] for i in range(len(pieces))]


def normalise(text: str) -> str:
    """One space between words, none at the ends (sherpa-onnx keeps a leading ``▁``'s space)."""
    return " ".join(text.split())


class OrtCtc:
    """``model.onnx`` (or its int8 version) in onnxruntime, lhotse fbank, greedy CTC."""

    def __init__(self, export_dir: Path, threads: int = 1, int8: bool = False):
        from lhotse import Fbank, FbankConfig

        self.session = ort_session(model_file(export_dir, int8), threads)
        self.pieces = read_tokens(Path(export_dir) / TOKENS)
        self.fbank = Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS))

    def features(self, samples: np.ndarray) -> np.ndarray:
        """(T, 80) fbank on the graph's input scale (that of 16-bit samples)."""
        return self.fbank.extract(samples, SAMPLE_RATE) + np.float32(LOG_INT16_POWER)

    def log_probs(self, feats: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CTC log-probabilities (N, T', V) and lengths of a padded (N, T, 80) batch."""
        out, out_lens = self.session.run(None, {"x": feats, "x_lens": lengths})
        return out, out_lens

    def transcribe(self, samples: np.ndarray) -> str:
        return self.decode_features(self.features(samples))

    def decode_features(self, feats: np.ndarray) -> str:
        """Greedy CTC transcript of one utterance's (T, 80) :meth:`features`."""
        log_probs, lengths = self.log_probs(feats[None], np.array([len(feats)], dtype=np.int64))
        best = log_probs[0, : lengths[0]].argmax(-1)
        keep = np.ones(len(best), dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        ids = best[keep & (best != 0)]
        return normalise("".join(self.pieces[i] for i in ids).replace("\u2581", " "))


class SherpaCtc:
    """The export directory in sherpa-onnx's offline recogniser (WeNet CTC convention)."""

    def __init__(self, export_dir: Path, threads: int = 1, int8: bool = False):
        import sherpa_onnx

        self.recognizer = sherpa_onnx.OfflineRecognizer.from_wenet_ctc(
            model=str(model_file(export_dir, int8)),
            tokens=str(Path(export_dir) / TOKENS),
            num_threads=threads,
            sample_rate=SAMPLE_RATE,
            feature_dim=NUM_MEL_BINS,
            decoding_method="greedy_search",
        )

    def transcribe(self, samples: np.ndarray) -> str:
        return self.decode_features(self.features(samples))

    def features(self, samples: np.ndarray):
        """A stream holding the utterance's features: sherpa-onnx computes its fbank as the
        waveform is accepted (kept apart so that a benchmark can time its front end)."""
        stream = self.recognizer.create_stream()
        stream.accept_waveform(SAMPLE_RATE, samples)
        return stream

    def decode_features(self, stream) -> str:
        """The model and the greedy search on a :meth:`features` stream."""
        self.recognizer.decode_stream(stream)
        return normalise(stream.result.text)
