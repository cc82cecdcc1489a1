"""What the Hugging Face adapters share: reading a ``save_pretrained`` directory's config,
loading with transformers' own load report silenced, casing references like the vocabulary,
and loading a batch's audio at the model's sampling rate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from lhotse import CutSet

from comflp.asr.config import ConfigError


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_hf_config(model_dir: Path):
    """The transformers config of ``model_dir``; ConfigError when there is none."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{model_dir}: no config.json (expected a Hugging Face model saved with save_pretrained)"
        )
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{model_dir}/config.json: not a Hugging Face model config ({first_line(e)})"
        ) from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level (comflp reports missing and unused weights itself;
    transformers' own report would flag known extra weights at every load)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def missing_weights(model_dir: Path, arch: str, missing: list[str]) -> ConfigError:
    """The error for weights a model class needs that the directory does not have."""
    names = sorted(missing)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ConfigError(f"{model_dir}: weights missing for {arch}: {', '.join(names[:5])}{more}")


def text_case(tokenizer) -> str:
    """How references are cased to match the vocabulary: ``upper``, ``lower`` or ``keep``.

    HF's ``do_lower_case`` (CTC tokenizers) means an upper-case vocabulary whose output is
    lower-cased.
    """
    if getattr(tokenizer, "do_lower_case", False):
        return "lower"
    letters = "".join(t for t in tokenizer.get_vocab() if t.isalpha())
    if letters and letters == letters.upper() and letters != letters.lower():
        return "upper"
    if letters and letters == letters.lower() and letters != letters.upper():
        return "lower"
    return "keep"


def normalize_text(text: str, case: str) -> str:
    """``text`` with single spaces, cased as :func:`text_case` says."""
    text = " ".join(text.split())
    return {"upper": text.upper(), "lower": text.lower(), "keep": text}[case]


def load_audio(cuts: CutSet, rate: int) -> list[np.ndarray]:
    """Each cut's samples (float32, first channel); ConfigError for another sampling rate."""
    for cut in cuts:
        if cut.sampling_rate != rate:
            raise ConfigError(
                f"cut {cut.id}: sampling rate {cut.sampling_rate} Hz, but the model expects "
                f"{rate // 1000} kHz audio (resample the corpus; comflp does not resample)"
            )
    return [np.asarray(c.load_audio()[0], dtype=np.float32) for c in cuts]
