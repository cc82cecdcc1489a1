#!/usr/bin/env python3
"""Export a model for deployment: --model_dir (a comflp model directory, unpruned or pruned by
stage 6, 8 or 9, or a Hugging Face CTC model) into --out_dir: model.onnx (+ model.int8.onnx),
tokens.txt and export.json, loadable by sherpa-onnx's OfflineRecognizer.from_wenet_ctc."""

from comflp.cli import main
from comflp.stages.export import ExportSettings, export_stage

if __name__ == "__main__":
    main(ExportSettings, export_stage, __doc__)
