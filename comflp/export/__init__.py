"""Export comflp models to ONNX, for onnxruntime and for sherpa-onnx's offline recogniser.

:func:`export_model` turns a model directory (comflp's own: unpruned, layer-pruned, structurally
pruned, Transformer or Conformer; or a Hugging Face wav2vec2-family CTC model) into a directory
that a deployment runtime loads; ``runtime`` decodes such a directory with onnxruntime or
sherpa-onnx. Both need the optional dependencies ``pip install comflp[export]``.
"""

from comflp.export.core import ExportError, ExportResult, export_model

__all__ = ["ExportError", "ExportResult", "export_model"]
