"""Experiment directories: checkpoints written atomically, models rebuilt from the directory alone.

An experiment directory holds ``config.yaml`` (the full model and training config),
``tokenizer.model``/``tokens.txt`` and ``cmvn.json`` (copies, so that it is self-contained),
``epoch-N.pt`` training checkpoints and ``model.pt``, the weights later stages use.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
import yaml

from comflp.asr.config import ConfigError, ExperimentConfig, config_from_dict, save_config
from comflp.asr.model import ASRModel
from comflp.expdir import CMVN, CONFIG, MODEL, TOKENIZER, TOKENS
from comflp.utils import atomic_save


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_save(lambda tmp: torch.save(state, tmp), path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; ConfigError names a file that is
    missing, unreadable (truncated, not a torch file) or not a checkpoint dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{path}: not a comflp checkpoint (no 'model' weights in it)")
    return state


def epoch_checkpoints(exp_dir: Path) -> list[Path]:
    """``epoch-N.pt`` files, in epoch order."""
    found = [
        (int(m.group(1)), p)
        for p in exp_dir.glob("epoch-*.pt")
        if (m := re.fullmatch(r"epoch-(\d+)\.pt", p.name))
    ]
    return [p for _, p in sorted(found)]


def load_experiment_config(exp_dir: Path) -> ExperimentConfig:
    path = Path(exp_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"{exp_dir}: no {CONFIG} here, so no model can be built from this directory "
            "(is it an experiment directory written by stage 3 or stage 6?)"
        )
    return config_from_dict(yaml.safe_load(path.read_text()), str(path))


def load_state_into(model: ASRModel, state_dict: dict, source: str) -> None:
    """Load weights, with a clear error when their shapes are not this model's."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatch(es), e.g. {k}: {tuple(state_dict[k].shape)} in the "
                f"checkpoint vs {tuple(own[k].shape)} in the model"
            )
        if missing:
            parts.append(f"{len(missing)} missing parameter(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s), e.g. {unexpected[0]}")
        raise ConfigError(
            f"{source}: checkpoint does not fit the model config ({'; '.join(parts)})"
        )
    model.load_state_dict(state_dict)


def load_model(exp_dir: Path, checkpoint: str = MODEL) -> ASRModel:
    """Rebuild the model of ``exp_dir`` from its config and load ``checkpoint`` (eval mode)."""
    exp_dir = Path(exp_dir)
    cfg = load_experiment_config(exp_dir)
    model = ASRModel(cfg.model)
    path = exp_dir / checkpoint
    load_state_into(model, load_checkpoint(path)["model"], str(path))
    return model.eval()


def save_model(
    model: ASRModel,
    cfg: ExperimentConfig,
    exp_dir: Path,
    extra: dict | None = None,
    name: str = MODEL,
) -> None:
    """Write ``config.yaml`` (``cfg`` with the model's own section) and the weights ``name``
    into ``exp_dir``."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, model=model.cfg), exp_dir / CONFIG)
    save_checkpoint({"model": model.state_dict(), **(extra or {})}, exp_dir / name)


def copy_assets(tokenizer_dir: Path, cmvn_path: Path, exp_dir: Path) -> None:
    """Copy the tokenizer files and CMVN statistics into ``exp_dir`` so it is self-contained."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        TOKENIZER: tokenizer_dir / TOKENIZER,
        TOKENS: tokenizer_dir / TOKENS,
        CMVN: cmvn_path,
    }
    for name, src in sources.items():
        if not src.is_file():
            raise FileNotFoundError(f"{src}: not found (run the stage that writes it)")
        if src.resolve() != (exp_dir / name).resolve():
            atomic_save(lambda tmp, src=src: shutil.copyfile(src, tmp), exp_dir / name)


def average_state_dicts(paths: list[Path]) -> dict:
    """Element-wise mean of the ``model`` weights of several checkpoints."""
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict = {}
    dtypes: dict = {}
    for path in paths:
        for k, v in load_checkpoint(path)["model"].items():
            if k not in total:
                dtypes[k] = v.dtype
                total[k] = v.double() if v.is_floating_point() else v.clone()
            elif v.is_floating_point():
                total[k] += v.double()
    return {
        k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()
    }
