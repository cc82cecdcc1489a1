"""Decoding: CTC greedy and prefix beam search, attention rescoring, and decoding a set with its
real-time factor, for any :class:`~comflp.adapters.base.PrunableModel`."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from comflp.adapters.base import PrunableModel
from comflp.asr.ctc import ctc_greedy_search
from comflp.asr.layers import padding_mask
from comflp.asr.model import ASRModel
from comflp.utils import eval_mode

METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention_rescoring")
NEG_INF = float("-inf")

Prefix = tuple[int, ...]


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two floats, exact for -inf."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, beam_size: int, top_k: int | None = None, blank: int = 0
) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over one utterance's (T, V) log-probabilities.

    Each prefix (a label sequence, blanks removed, repeats merged) carries the log-probability
    of all alignments of the frames so far that collapse to it, split into those ending in a
    blank and those ending in its last label: a repeated label extends the prefix only after
    a blank. After each frame the ``beam_size`` most probable prefixes are kept.

    ``top_k``: when given, only the ``top_k`` most probable tokens of each frame (blank
    included) extend the prefixes, as WeNet does with ``top_k = beam_size``; much faster for
    large vocabularies, but no longer exact. ``None`` considers every token.

    Returns up to ``beam_size`` (token ids, log-probability) pairs, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    frames = log_probs.detach().float().cpu()
    k = frames.size(-1) if top_k is None else min(top_k, frames.size(-1))
    values, indices = frames.topk(k, dim=-1)
    beams: dict[Prefix, tuple[float, float]] = {(): (0.0, NEG_INF)}
    for frame_ids, frame_values in zip(indices.tolist(), values.tolist(), strict=True):
        frame = list(zip(frame_ids, frame_values, strict=True))
        beams = _best_prefixes(_extend(beams, frame, blank), beam_size)
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in beams.items()]


def _extend(
    beams: dict[Prefix, tuple[float, float]], frame: list[tuple[int, float]], blank: int
) -> dict[Prefix, list[float]]:
    """One frame of prefix search: (blank-ending, label-ending) log-probabilities per prefix.

    ``frame``: the (token, log-probability) pairs of the frame that may extend a prefix.
    """
    out: dict[Prefix, list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
    for prefix, (p_blank, p_label) in beams.items():
        p_total = _logaddexp(p_blank, p_label)
        last = prefix[-1] if prefix else None
        for token, lp in frame:
            if token == blank:
                same = out[prefix]
                same[0] = _logaddexp(same[0], p_total + lp)
            elif token == last:
                same = out[prefix]  # the repeat merges into the last label
                same[1] = _logaddexp(same[1], p_label + lp)
                longer = out[prefix + (token,)]  # a new label only after a blank
                longer[1] = _logaddexp(longer[1], p_blank + lp)
            else:
                longer = out[prefix + (token,)]
                longer[1] = _logaddexp(longer[1], p_total + lp)
    return out


def _best_prefixes(
    scores: dict[Prefix, list[float]], beam_size: int
) -> dict[Prefix, tuple[float, float]]:
    """The ``beam_size`` most probable prefixes, best first (impossible ones dropped)."""
    ranked = sorted(
        ((_logaddexp(*s), prefix, s) for prefix, s in scores.items()),
        key=lambda item: item[0],
        reverse=True,
    )
    return {prefix: (s[0], s[1]) for total, prefix, s in ranked[:beam_size] if total > NEG_INF}


@torch.no_grad()
def attention_rescoring(
    model: ASRModel,
    encoder_out: torch.Tensor,
    nbest: list[tuple[list[int], float]],
    ctc_weight: float,
) -> tuple[list[int], list[float]]:
    """Rescore CTC n-best hypotheses with the attention decoder, all in one batch.

    ``encoder_out``: (T, D) encoder output of one utterance (its valid frames only).
    A hypothesis's attention score is the teacher-forced log-probability of its tokens
    followed by <sos/eos>; its score is ``ctc_weight * ctc + (1 - ctc_weight) * attention``.
    Returns the best hypothesis and the scores of all, in n-best order.
    """
    if model.decoder is None:
        raise ValueError("attention_rescoring needs a model with an attention decoder")
    if not nbest:
        raise ValueError("attention_rescoring: empty n-best list")
    device = encoder_out.device
    eos = torch.tensor([model.sos_eos])
    hyps = [torch.tensor(tokens, dtype=torch.long) for tokens, _ in nbest]
    ys_in = pad_sequence([torch.cat([eos, h]) for h in hyps], batch_first=True).to(device)
    ys_out = pad_sequence([torch.cat([h, eos]) for h in hyps], batch_first=True).to(device)
    lens = torch.tensor([len(h) + 1 for h in hyps], device=device)
    n = len(hyps)
    memory = encoder_out.unsqueeze(0).expand(n, -1, -1)
    memory_lens = torch.full((n,), encoder_out.size(0), device=device)
    log_probs = model.decoder(ys_in, lens, memory, memory_lens).float().log_softmax(-1)
    token_scores = log_probs.gather(-1, ys_out.unsqueeze(-1)).squeeze(-1)
    att = token_scores.masked_fill(padding_mask(lens, ys_out.size(1)), 0.0).sum(-1).cpu().double()
    ctc = torch.tensor([score for _, score in nbest], dtype=torch.float64)
    scores = ctc_weight * ctc + (1 - ctc_weight) * att
    return list(nbest[int(scores.argmax())][0]), scores.tolist()


def check_decoding_options(
    model: PrunableModel, method: str, beam_size: int, ctc_weight: float
) -> None:
    """Raise ValueError for options :func:`decode_batch` cannot use with ``model``."""
    if method not in METHODS:
        raise ValueError(
            f"unknown decoding method {method!r}; expected one of {', '.join(METHODS)}"
        )
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 0 <= ctc_weight <= 1:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if (
        method == "attention_rescoring"
        and getattr(getattr(model, "asr", None), "decoder", None) is None
    ):
        raise ValueError(
            "attention_rescoring needs a comflp model with an attention decoder (decoder_layers > 0)"
        )


@torch.no_grad()
def decode_batch(
    model: PrunableModel,
    batch: dict,
    method: str = "ctc_greedy_search",
    beam_size: int = 10,
    ctc_weight: float = 0.3,
) -> list[list[int]]:
    """Token ids per utterance of a batch, the encoder run once for the batch.

    ``method``: ``ctc_greedy_search``, ``ctc_prefix_beam_search`` (per-frame tokens pruned to
    the top ``beam_size``) or ``attention_rescoring`` (its n-best rescored by the decoder of a
    comflp model, weighted by ``ctc_weight``). The model runs in eval mode; its mode is
    restored after.
    """
    check_decoding_options(model, method, beam_size, ctc_weight)
    with eval_mode(model.module):
        h = model.forward_layers(model.embed(batch))
        log_probs, ctc_lens = model.readout(h)
        if method == "ctc_greedy_search":
            return ctc_greedy_search(log_probs, ctc_lens, model.blank_id)
        hyps = []
        for i, n in enumerate(ctc_lens.tolist()):
            nbest = ctc_prefix_beam_search(log_probs[i, :n], beam_size, beam_size, model.blank_id)
            if method == "attention_rescoring" and len(nbest) > 1:
                enc = model.asr.encoder.after_norm(h.x[i, : int(h.lengths[i])])
                hyps.append(attention_rescoring(model.asr, enc, nbest, ctc_weight)[0])
            else:
                hyps.append(nbest[0][0])
        return hyps


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
    beam_size: int = 10,
    ctc_weight: float = 0.3,
) -> DecodeResult:
    """Decode every batch (of ``model.dataset()``) with :func:`decode_batch`."""
    check_decoding_options(model, method, beam_size, ctc_weight)
    utts: list[dict] = []
    audio_seconds = decode_seconds = 0.0
    for batch in batches:
        start = time.perf_counter()
        hyps = decode_batch(model, batch, method, beam_size, ctc_weight)
        decode_seconds += time.perf_counter() - start
        audio_seconds += batch["seconds"]
        for utt_id, ref, hyp in zip(batch["ids"], batch["texts"], hyps, strict=True):
            utts.append({"id": utt_id, "ref": ref, "hyp": model.decode_ids(hyp)})
    return DecodeResult(utts, audio_seconds, decode_seconds)
