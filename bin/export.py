#!/usr/bin/env python3
"""Export a model for deployment: --model_dir (a comflp model directory, unpruned, pruned by
stage 6/8 or structurally pruned by stage 9, or a Hugging Face save_pretrained CTC model) into
--out_dir: model.onnx (+ model.int8.onnx with --int8 true), tokens.txt and export.json. A comflp
model's directory is what sherpa-onnx's offline recogniser loads as a WeNet CTC model:

    python bin/export.py --model_dir exp/baseline --out_dir exp/baseline/onnx --int8 true
    sherpa_onnx.OfflineRecognizer.from_wenet_ctc(model="exp/baseline/onnx/model.onnx",
                                                 tokens="exp/baseline/onnx/tokens.txt")

Needs the optional dependencies: pip install -e '.[export]'.
"""

import argparse
import logging
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run, str2bool


def main(args: argparse.Namespace) -> None:
    from comflp.export import ExportError, export_model

    try:
        result = export_model(args.model_dir, args.out_dir, args.model_type, args.opset, args.int8)
    except ExportError as e:
        raise UsageError(str(e)) from None
    info = result.info
    logging.info(
        f"{args.out_dir}: {', '.join(info['models'])} ({result.model_type}, opset {args.opset}; "
        f"onnxruntime vs torch max |diff| {info['self_check_max_abs_diff']:.2g})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_dir", type=Path, required=True, help="the model to export")
    parser.add_argument("--out_dir", type=Path, required=True, help="the export directory")
    parser.add_argument(
        "--model_type", default="auto", help="native, hf, or auto (from the directory's files)"
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 to 22")
    parser.add_argument(
        "--int8", type=str2bool, default=False, help="also write a dynamic int8 model"
    )
    add_common_args(parser)
    run(main, parser)
