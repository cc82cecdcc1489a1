"""Hugging Face wav2vec2-family CTC models (comflp's ``hf`` adapter) as ONNX for onnxruntime.

``model.onnx``: ``samples`` (N, S) float32 waveform in [-1, 1] at the processor's rate,
``sample_lens`` (N,) int64 -> ``log_probs`` (N, T, V), ``log_probs_len`` (N,) int64. The
processor's normalisation (``do_normalize``: zero mean, unit variance) is inside the graph, over
each utterance's own samples, as the processor normalises one utterance, so a caller feeds raw
samples (a processor that returns no attention mask normalises a padded batch over its padding
too; the graph does not copy that batching artefact). The processor is saved beside the model
for its vocabulary.

Not for sherpa-onnx: its offline CTC conventions for fbank models (WeNet, NeMo, zipformer,
...) hand the model features it computed; these models read the waveform.
"""

from __future__ import annotations

from pathlib import Path

import torch

from comflp.adapters.hf import HFModel
from comflp.export.graph import save_with_metadata, self_check, to_onnx

INPUT_NAMES = ("samples", "sample_lens")
OUTPUT_NAMES = ("log_probs", "log_probs_len")
NORMALISE_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


class WaveformCtc(torch.nn.Module):
    """Raw samples -> the processor's normalisation -> the adapter's log-probabilities."""

    def __init__(self, model: HFModel):
        super().__init__()
        self.model = model
        self.hf = model.hf  # registered, so that eval() and the exporter see the weights
        extractor = model.processor.feature_extractor
        self.normalise = bool(extractor.do_normalize)
        self.with_mask = bool(extractor.return_attention_mask)

    def forward(self, samples: torch.Tensor, sample_lens: torch.Tensor):
        valid = torch.arange(samples.size(1))[None, :] < sample_lens[:, None]
        if self.normalise:
            n = sample_lens[:, None].to(samples.dtype)
            mean = (samples * valid).sum(1, keepdim=True) / n
            var = (((samples - mean) * valid) ** 2).sum(1, keepdim=True) / n
            samples = (samples - mean) / torch.sqrt(var + NORMALISE_EPS) * valid
        batch = {
            "audio": samples,
            "audio_lens": sample_lens,
            "attention_mask": valid.long() if self.with_mask else None,
        }
        return self.model.log_probs(batch)


def example_inputs(rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, rate * 2, generator=g) * 0.1
    return samples, torch.tensor([rate * 2, rate * 3 // 2])


def export_hf(model: HFModel, out_dir: Path, opset: int) -> dict:
    """Write ``model.onnx`` and the processor files into ``out_dir``."""
    graph = WaveformCtc(model).eval()
    rate = model.processor.feature_extractor.sampling_rate
    batch = torch.export.Dim("batch", min=1, max=1024)
    samples = torch.export.Dim("samples", min=rate // 10, max=rate * 600)
    shapes = {"samples": {0: batch, 1: samples}, "sample_lens": {0: batch}}
    inputs = example_inputs(rate)
    what = f"{model.source} ({type(model.hf).__name__})"
    proto = to_onnx(graph, inputs, (INPUT_NAMES, OUTPUT_NAMES), shapes, opset, what)
    meta = {
        "model_type": "comflp_hf_ctc",
        "hf_architecture": type(model.hf).__name__,
        "vocab_size": model.hf.config.vocab_size,
        "blank_id": model.blank_id,
        "sample_rate": rate,
        "num_layers": model.num_layers,
    }
    save_with_metadata(proto, out_dir / "model.onnx", meta)
    model.processor.save_pretrained(out_dir)
    return {
        "metadata": meta,
        "self_check_max_abs_diff": self_check(out_dir / "model.onnx", graph, inputs, what),
    }
