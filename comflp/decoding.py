"""Decoding a set with any :class:`~comflp.adapters.base.PrunableModel`: hypotheses and the
real-time factor (the decoding methods themselves belong to the model: ``model.decode``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from comflp.adapters.base import CTC_WEIGHT, DECODE_BEAM_SIZE, PrunableModel


@dataclass
class DecodeResult:
    """The decoded utterances of a set and the time it took."""

    utts: list[dict]  # {"id", "ref", "hyp"} per utterance, in loader order
    audio_seconds: float
    decode_seconds: float  # model and search; data loading excluded

    @property
    def rtf(self) -> float:
        """Real-time factor: decoding time / audio duration."""
        return self.decode_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def timing(self) -> dict:
        """Counts and times for a scores file."""
        return {
            "num_utts": len(self.utts),
            "audio_seconds": self.audio_seconds,
            "decode_seconds": self.decode_seconds,
            "rtf": self.rtf,
        }


def decode_set(
    model: PrunableModel,
    batches: Iterable[dict],
    method: str = "ctc_greedy_search",
    beam_size: int = DECODE_BEAM_SIZE,
    ctc_weight: float = CTC_WEIGHT,
) -> DecodeResult:
    """Decode every batch (of ``model.dataset()``) with ``model.decode``."""
    model.check_decoding(method, beam_size, ctc_weight)
    utts: list[dict] = []
    audio_seconds = decode_seconds = 0.0
    for batch in batches:
        start = time.perf_counter()
        hyps = model.decode(batch, method, beam_size, ctc_weight)
        decode_seconds += time.perf_counter() - start
        audio_seconds += batch["seconds"]
        for utt_id, ref, hyp in zip(batch["ids"], batch["texts"], hyps, strict=True):
            utts.append({"id": utt_id, "ref": ref, "hyp": model.decode_ids(hyp)})
    return DecodeResult(utts, audio_seconds, decode_seconds)
