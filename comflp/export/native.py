"""comflp's own CTC models as ONNX in sherpa-onnx's WeNet-CTC convention.

Why that convention: sherpa-onnx computes the features itself, and of the offline CTC
conventions it loads, the WeNet one keeps kaldi-native-fbank's Kaldi defaults (povey window, DC
removal, pre-emphasis 0.97, 20 Hz to Nyquist - 400 Hz, no dither, no edge snipping), which are
lhotse's ``Fbank`` defaults that comflp trains on; it takes the output lengths from the model
(comflp's subsampling and ``ctc_upsample`` decide them) and reads only ``vocab_size`` and
``subsampling_factor``. Its NeMo convention would compute librosa-style features (Hann window,
no DC removal, 0 Hz to Nyquist) and output lengths of its own (input frames / factor).

What differs from lhotse is the sample scale: for WeNet models sherpa-onnx multiplies the
samples by 32768, which adds ``2 ln 32768`` to every log-mel energy, and floors the energies
at float32's epsilon on that scale, where lhotse floors them on the [-1, 1] scale. The graph
undoes both before the global CMVN (so CMVN is inside, as in WeNet's own export): on the built-in
corpus, where silence is digital zeros, 6% of the log-mel values sit on the floor.

``model.onnx``: ``x`` (N, T, 80) log-mel fbank of 16-bit-scale samples, ``x_lens`` (N,) int64
-> ``log_probs`` (N, T' u, V) CTC log-probabilities (u = ``ctc_upsample`` distributions per
40 ms encoder frame), ``log_probs_len`` (N,) int64.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from comflp.adapters.native import NativeModel
from comflp.asr.layers import MIN_INPUT_FRAMES, RelPositionalEncoding
from comflp.asr.model import ASRModel
from comflp.export.graph import save_with_metadata, self_check, to_onnx

# What sherpa-onnx's x32768 sample scale adds to every log-mel energy.
LOG_INT16_POWER = 2 * math.log(32768.0)
# lhotse's (and kaldi-native-fbank's) floor on mel energies: log(float32 epsilon).
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)
SUBSAMPLING = 4  # Conv2dSubsampling: two stride-2 convolutions
FRAME_SHIFT_MS = 10
NUM_MEL_BINS = 80
SAMPLE_RATE = 16000
INPUT_NAMES = ("x", "x_lens")
OUTPUT_NAMES = ("log_probs", "log_probs_len")


class FbankCtc(torch.nn.Module):
    """What ``model.onnx`` computes: sherpa-onnx's fbank -> lhotse's fbank -> global CMVN ->
    the encoder -> CTC log-probabilities and their lengths."""

    def __init__(self, asr: ASRModel, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.asr = asr
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.clamp(x - LOG_INT16_POWER, min=LOG_FLOOR)
        return self.asr.ctc_log_probs((x - self.mean) / self.std, x_lens)


def max_input_frames(asr: ASRModel) -> int:
    """The most fbank frames the graph takes: the front end's position table holds 5000
    encoder frames (200 s of audio) and the exported graph keeps that size."""
    pos = asr.encoder.embed.pos
    rows = pos.pe.size(0)
    encoder_frames = (rows + 1) // 2 if isinstance(pos, RelPositionalEncoding) else rows
    return SUBSAMPLING * encoder_frames + 6  # ((4n + 6 - 1) // 2 - 1) // 2 = n


def example_inputs(num_frames: int = 203) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two utterances of different lengths, features on sherpa-onnx's scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, num_frames, NUM_MEL_BINS, generator=g) * 2 + LOG_INT16_POWER
    return x, torch.tensor([num_frames, num_frames * 2 // 3])


def metadata(model: NativeModel, max_frames: int) -> dict:
    """ONNX metadata: what sherpa-onnx's WeNet CTC loader reads, and what comflp adds."""
    cfg = model.asr.cfg
    u = cfg.ctc_upsample
    return {
        # read by sherpa-onnx: vocab_size must equal the lines of tokens.txt; the factor
        # gives timestamps (an integer there: exact when ctc_upsample divides 4)
        "vocab_size": cfg.vocab_size,
        "subsampling_factor": max(1, round(SUBSAMPLING / u)),
        "model_type": "comflp_ctc",
        "comflp_encoder_type": cfg.encoder_type,
        "comflp_num_layers": cfg.num_layers,
        "comflp_kept_layers": " ".join(map(str, cfg.kept_layers or [])),
        "comflp_structured": int(cfg.layer_shapes is not None),
        "comflp_ctc_upsample": u,
        "blank_id": 0,
        "sample_rate": SAMPLE_RATE,
        "feature": f"kaldi fbank, {NUM_MEL_BINS} bins, of samples scaled to 16-bit range; "
        "global CMVN inside the graph",
        "max_input_frames": max_frames,
    }


def write_tokens(model: NativeModel, path: Path) -> None:
    """``piece id`` per line for every output id; id 0 (comflp's CTC blank) is written
    ``<blk>``, the name sherpa-onnx looks the blank up by."""
    pieces = model.tokenizer.tokens()
    pieces[0] = "<blk>"
    path.write_text("".join(f"{p} {i}\n" for i, p in enumerate(pieces)))


def export_native(model: NativeModel, out_dir: Path, opset: int) -> dict:
    """Write ``model.onnx`` and ``tokens.txt`` into ``out_dir``; returns what export.json
    records of them."""
    mean, std = model.cmvn
    graph = FbankCtc(model.asr.eval(), mean, std).eval()
    frames = torch.export.Dim("frames", min=MIN_INPUT_FRAMES, max=max_input_frames(model.asr))
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {"x": {0: batch, 1: frames}, "x_lens": {0: batch}}
    inputs = example_inputs()
    what = f"{model.source} ({model.asr.cfg.encoder_type})"
    proto = to_onnx(graph, inputs, (INPUT_NAMES, OUTPUT_NAMES), shapes, opset, what)
    meta = metadata(model, max_input_frames(model.asr))
    save_with_metadata(proto, out_dir / "model.onnx", meta)
    write_tokens(model, out_dir / "tokens.txt")
    return {
        "metadata": meta,
        "self_check_max_abs_diff": self_check(out_dir / "model.onnx", graph, inputs, what),
        "sherpa_onnx": "sherpa_onnx.OfflineRecognizer.from_wenet_ctc(model='model.onnx', "
        "tokens='tokens.txt')",
    }
