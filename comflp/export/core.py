"""Export a model directory into a deployment directory, atomically.

The output directory is written under a temporary name beside it and renamed into place only
when every file is there; a failed export leaves nothing. It holds ``model.onnx`` (float32),
``model.int8.onnx`` (with ``int8``), what the runtime needs to decode (``tokens.txt``; a Hugging
Face model's processor files) and ``export.json`` (what was exported, how, and the self-check
of the graph against torch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from comflp import expdir
from comflp.adapters import MODEL_TYPES
from comflp.asr.config import ConfigError
from comflp.export.graph import INT8_OP_TYPES, ExportError, check_opset, quantize_int8
from comflp.registry import Registry
from comflp.report.provenance import git_commit
from comflp.utils import atomic_write_json

EXPORT_INFO = "export.json"
FLOAT_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"


@dataclass
class ExportResult:
    out_dir: Path
    model_type: str
    info: dict  # the contents of export.json


@dataclass(frozen=True)
class Exporter:
    """One model type's export: ``export(model, out_dir, opset)`` -> export info;
    ``detects(model_dir)``: whether a directory holds this type's model (``--model_type auto``),
    ``expects``: what that is, for the error when no exporter detects a directory."""

    export: Callable[..., dict]
    detects: Callable[[Path], bool]
    expects: str


# Exporters by model type (the names of MODEL_TYPES), in the order auto-detection asks them.
# The export code is imported on use, so that the model types load without its dependencies.
EXPORTERS: Registry[Exporter] = Registry("exporter")


def _native(model, out_dir: Path, opset: int) -> dict:
    from comflp.export.native import export_native

    return export_native(model, out_dir, opset)


def _hf(model, out_dir: Path, opset: int) -> dict:
    from comflp.export.hf import export_hf

    return export_hf(model, out_dir, opset)


EXPORTERS.add(
    "native",
    Exporter(
        _native,
        lambda d: (d / expdir.CONFIG).is_file(),
        f"{expdir.CONFIG} and {expdir.MODEL} of a comflp model",
    ),
)
EXPORTERS.add(
    "hf",
    Exporter(
        _hf,
        lambda d: (d / "config.json").is_file() and not (d / "model.bin").is_file(),
        "config.json of a Hugging Face model",
    ),
)


REQUIRED = ("onnx", "onnxscript", "onnxruntime")


def check_dependencies() -> None:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"export needs {', '.join(missing)}: pip install -e '.[export]'")


def detect_model_type(model_dir: Path) -> str:
    """The first model type whose exporter detects ``model_dir``."""
    if not model_dir.is_dir():
        raise ExportError(f"--model_dir {model_dir}: not a directory")
    for name in EXPORTERS.names():
        if EXPORTERS[name].detects(model_dir):
            return name
    expected = ", or ".join(EXPORTERS[name].expects for name in EXPORTERS.names())
    raise ExportError(f"--model_dir {model_dir}: not a model directory (expected {expected})")


def load_for_export(model_dir: Path, model_type: str):
    """The :class:`PrunableModel` in ``model_dir``; ExportError for a type with no exporter."""
    if model_type == "auto":
        model_type = detect_model_type(model_dir)
    if model_type not in EXPORTERS:
        why = "no exporter for this model type" if model_type in MODEL_TYPES else "unknown"
        raise ExportError(
            f"--model_type {model_type}: {why}; export supports {', '.join(EXPORTERS.names())} or auto"
        )
    if not model_dir.is_dir():
        raise ExportError(f"--model_dir {model_dir}: not a directory")
    if model_type == "hf":
        _check_hf_ctc(model_dir)
    try:
        return MODEL_TYPES[model_type].load(model_dir), model_type
    except (ConfigError, FileNotFoundError) as e:
        where = "" if str(e).startswith(str(model_dir)) else f"--model_dir {model_dir}: "
        raise ExportError(f"{where}{e}") from None


def _check_hf_ctc(model_dir: Path) -> None:
    """The hf exporter writes CTC models; an encoder-decoder (Whisper) is refused before loading."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{model_dir}/config.json: cannot read it ({e})") from None
    archs = config.get("architectures") or []
    if config.get("model_type") == "whisper" or (
        archs and not any(a.endswith("ForCTC") for a in archs)
    ):
        raise ExportError(
            f"--model_dir {model_dir}: unsupported architecture {(archs or [config.get('model_type')])[0]} for export "
            "(Hugging Face models export as CTC models: *ForCTC)"
        )


def _check_destination(out_dir: Path, model_dir: Path) -> None:
    """Refuse an output directory that would replace the model or a directory that is not a
    previous export."""
    out, src = out_dir.resolve(), model_dir.resolve()
    if out == src or out in src.parents:
        raise ExportError(f"--out_dir {out_dir}: would replace the model directory {model_dir}")
    if out_dir.exists() and not (out_dir / EXPORT_INFO).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ExportError(
                f"--out_dir {out_dir}: exists and is not an export directory (no {EXPORT_INFO}); "
                "remove it or choose another"
            )


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that replaces it on success."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it the usual permissions
    try:
        yield tmp
        if out_dir.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export_model(
    model_dir: Path, out_dir: Path, model_type: str = "auto", opset: int = 18, int8: bool = False
) -> ExportResult:
    """Export ``model_dir`` into ``out_dir`` (see the module docstring); ExportError names the
    bad input and leaves ``out_dir`` as it was."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_dependencies()
    check_opset(opset)
    _check_destination(out_dir, model_dir)
    model, model_type = load_for_export(model_dir, model_type)
    model.module.eval()
    with staged_directory(out_dir) as tmp:
        info = EXPORTERS[model_type].export(model, tmp, opset)
        files = [FLOAT_MODEL]
        if int8:
            quantize_int8(tmp / FLOAT_MODEL, tmp / INT8_MODEL)
            files.append(INT8_MODEL)
        info = {
            "model_dir": str(model_dir.resolve()),
            "model_type": model_type,
            "opset": opset,
            "models": files,
            "int8_op_types": list(INT8_OP_TYPES) if int8 else None,
            "num_parameters": model.num_parameters(),
            "comflp_commit": git_commit(),
            **info,
        }
        atomic_write_json(tmp / EXPORT_INFO, info)
    return ExportResult(out_dir, model_type, info)
