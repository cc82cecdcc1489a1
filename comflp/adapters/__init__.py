"""Models the pruning pipeline can work on, each behind :class:`PrunableModel`."""

from __future__ import annotations

from pathlib import Path

from comflp.adapters.base import PrunableModel

MODEL_TYPES = ("comflp", "hf")


def load_prunable(model_type: str, model_dir: Path) -> PrunableModel:
    """Load the model in ``model_dir`` as a :class:`PrunableModel` of ``model_type``."""
    if model_type == "comflp":
        from comflp.adapters.native import NativeModel

        return NativeModel.load(model_dir)
    if model_type == "hf":
        from comflp.adapters.hf import HFModel

        return HFModel.load(model_dir)
    raise ValueError(f"unknown model type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
