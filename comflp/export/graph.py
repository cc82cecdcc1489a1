"""torch -> ONNX for every exported model type: one self-contained file at a checked opset,
metadata, a self-check against torch, and int8 dynamic quantisation."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from comflp.errors import InputError

# torch.onnx's exporter (torch.export + onnxscript) writes opset-18 graphs; asked for a lower
# opset it warns and keeps 18, which would label a file with an opset it does not have. From
# opset 23 on it writes scaled_dot_product_attention as ONNX's Attention op, which neither
# onnxruntime 1.32 nor sherpa-onnx's 1.28 runs with comflp's (B, 1, 1, T) padding mask.
MIN_OPSET, MAX_OPSET = 18, 22
INT8_OP_TYPES = ("MatMul", "Gemm")  # the weight matrices; see quantize_int8


class ExportError(InputError):
    """A model, option or directory that cannot be exported: one line saying which and why."""


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset}: comflp models export at opset {MIN_OPSET} to {MAX_OPSET} "
            f"(torch.onnx writes opset-{MIN_OPSET} graphs at the least; from opset 23 on its "
            "Attention op does not run in onnxruntime with comflp's padding mask)"
        )


@contextlib.contextmanager
def quiet():
    """Silence the exporter's and the quantiser's progress prints, info logs and warnings
    (torchvision ops, every tensor left alone, ...) for one call."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def to_onnx(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[Sequence[str], Sequence[str]],
    dynamic_shapes: dict,
    opset: int,
    what: str,
):
    """The ONNX ModelProto of ``module`` (eval mode) with the weights inside it (sherpa-onnx
    reads a model from one buffer, so no external data file), at exactly ``opset``."""
    import onnx

    module.eval()
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=list(names[0]),
                output_names=list(names[1]),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; each is one line to the user
        raise ExportError(
            f"{what}: torch.onnx cannot export it at opset {opset} "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    proto = program.model_proto
    got = sorted({o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")})
    if got != [opset]:
        raise ExportError(f"--opset {opset}: the exported graph of {what} has opset {got}")
    onnx.checker.check_model(proto)
    return proto


def save_with_metadata(proto, path: Path, metadata: dict) -> None:
    """Write ``proto`` with ``metadata`` (string values) as its metadata_props."""
    import onnx

    onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    onnx.save(proto, str(path))


def ort_session(path: Path, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads (the inter-op pool off)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def self_check(
    path: Path, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], what: str
) -> float:
    """Max |onnxruntime - torch| of the first output over the valid frames of a batch of
    ``inputs`` (second output: lengths); ExportError above 1e-3 or for different lengths."""
    try:
        session = ort_session(path)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
        got, got_lens = session.run(None, feeds)
    except Exception as e:  # onnxruntime's own error types
        raise ExportError(
            f"{what}: onnxruntime cannot run the exported graph ({_first_line(e)[:300]})"
        ) from None
    with torch.no_grad():
        ref, ref_lens = module(*inputs)
    if not np.array_equal(got_lens, ref_lens.numpy()):
        raise ExportError(f"{what}: onnxruntime gives lengths {got_lens}, torch {ref_lens}")
    diff = max(float(np.abs(got[i, :n] - ref[i, :n].numpy()).max()) for i, n in enumerate(ref_lens))
    if diff > 1e-3:
        raise ExportError(f"{what}: onnxruntime differs from torch by {diff:.2g} (max |diff|)")
    return diff


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation (onnxruntime): int8 weights of the matrix multiplications,
    activations quantised per batch at run time, after onnxruntime's recommended pre-processing
    (shape inference, graph optimisation). Convolutions stay float32: onnxruntime's dynamic
    ConvInteger is slower on CPU than the float convolution it replaces."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = dst.with_name(f".{dst.name}.prepared.onnx")
    try:
        # symbolic shape inference cannot follow the Conformer's relative shift; ONNX's can
        with quiet():
            quant_pre_process(src, prepared, skip_symbolic_shape=True)
            quantize_dynamic(
                prepared, dst, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES)
            )
    except Exception as e:  # onnxruntime's quantiser raises bare Exceptions
        raise ExportError(f"{src}: int8 quantisation failed ({_first_line(e)})") from None
    finally:
        prepared.unlink(missing_ok=True)
