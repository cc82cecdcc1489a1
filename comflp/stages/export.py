"""Export (after stage 3, 6, 8 or 9; not a stage of run.sh): a model directory to ONNX for
onnxruntime and sherpa-onnx (:mod:`comflp.export`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from comflp.settings import REQUIRED, option


@dataclass(kw_only=True)
class ExportSettings:
    """A model directory (comflp's, any size; or a Hugging Face CTC model) -> an export one."""

    model_dir: Path = option(REQUIRED, "the model to export")
    out_dir: Path = option(REQUIRED, "the export directory (replaced only when complete)")
    model_type: str = option("auto", "native, hf, or auto (from the directory's files)")
    opset: int = option(18, "ONNX opset, 18 to 22")
    int8: bool = option(False, "also write a dynamic int8 model")


def export_stage(s: ExportSettings) -> None:
    from comflp.export import export_model

    result = export_model(s.model_dir, s.out_dir, s.model_type, s.opset, s.int8)
    info = result.info
    logging.info(
        f"{s.out_dir}: {', '.join(info['models'])} ({result.model_type}, opset {s.opset}; "
        f"onnxruntime vs torch max |diff| {info['self_check_max_abs_diff']:.2g})"
    )
