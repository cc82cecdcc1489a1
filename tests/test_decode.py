import itertools
import math
import time
from pathlib import Path

import pytest
import torch

from comflp.adapters.native import NativeModel, native_model
from comflp.asr.config import ModelConfig
from comflp.asr.ctc import ctc_greedy_search, ctc_prefix_beam_search
from comflp.asr.model import ASRModel
from comflp.asr.rescoring import attention_rescoring
from comflp.decoding import decode_set

VOCAB = 7


def tiny_model(decoder: bool = True, seed: int = 0) -> ASRModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        num_layers=2,
        decoder_layers=1 if decoder else 0,
        ctc_weight=0.5 if decoder else 1.0,
        subsampling_channels=4,
    )
    return ASRModel(cfg)


def random_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), 80, generator=gen)
    lens = torch.tensor(lengths)
    feats[torch.arange(max(lengths))[None, :] >= lens[:, None]] = 0.0
    return feats, lens


def random_log_probs(gen: torch.Generator, t: int, v: int) -> torch.Tensor:
    return torch.randn(t, v, generator=gen).mul(2).log_softmax(-1)


def peaky_log_probs(gen: torch.Generator, t: int, v: int, min_peak: float) -> torch.Tensor:
    """Each frame's most probable token (blank 40% of the time) gets at least ``min_peak``."""
    top = torch.randint(1, v, (t,), generator=gen)
    top[torch.rand(t, generator=gen) < 0.4] = 0
    peak = min_peak + (0.99 - min_peak) * torch.rand(t, generator=gen)
    rest = -torch.rand(t, v, generator=gen).log()
    rest[torch.arange(t), top] = 0.0
    probs = rest / rest.sum(-1, keepdim=True) * (1 - peak)[:, None]
    probs[torch.arange(t), top] = peak
    return probs.log()


def greedy(log_probs: torch.Tensor) -> list[int]:
    return ctc_greedy_search(log_probs[None], torch.tensor([log_probs.size(0)]))[0]


def brute_force_prefixes(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Log-probability of every label sequence: sum over all alignments collapsing to it."""
    t, v = log_probs.shape
    per_prefix: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(v), repeat=t):
        labels = tuple(k for k, _ in itertools.groupby(path) if k != 0)
        score = sum(log_probs[i, k].item() for i, k in enumerate(path))
        per_prefix.setdefault(labels, []).append(score)
    return {p: torch.logsumexp(torch.tensor(s), 0).item() for p, s in per_prefix.items()}


@pytest.mark.parametrize("t,v", [(1, 3), (4, 3), (5, 3), (4, 4)])
def test_prefix_beam_search_is_exact_with_a_full_beam(t, v):
    gen = torch.Generator().manual_seed(10 * t + v)
    for _ in range(3):
        log_probs = random_log_probs(gen, t, v)
        expected = brute_force_prefixes(log_probs)
        nbest = ctc_prefix_beam_search(log_probs, beam_size=len(expected))
        assert {tuple(p): s for p, s in nbest} == pytest.approx(expected, abs=1e-5)
        scores = [s for _, s in nbest]
        assert scores == sorted(scores, reverse=True)
        assert math.fsum(math.exp(s) for s in scores) == pytest.approx(1.0, abs=1e-5)
        best = max(expected, key=expected.get)
        assert nbest[0][0] == list(best)
        assert nbest[0][1] == pytest.approx(expected[best], abs=1e-5)


def test_prefix_beam_search_merges_repeats_only_without_a_blank_between():
    # Frames: a a _ a with certainty: the only alignment collapses to "a a".
    log_probs = torch.full((4, 3), -1e4)
    log_probs[[0, 1, 3], 1] = 0.0
    log_probs[2, 0] = 0.0
    nbest = ctc_prefix_beam_search(log_probs, beam_size=3)
    assert nbest[0][0] == [1, 1]
    assert nbest[0][1] == pytest.approx(0.0)


def test_beam_one_equals_greedy_on_peaky_distributions():
    """Beam-1 prefix search keeps one prefix and sums its blank- and label-ending alignments,
    so it can leave the best path (see the next test). It provably follows the best path when
    every frame's most probable token has probability q > 3/4: by induction the prefix is the
    best path's collapse, and the alignments ending like the best path (in a blank, or in its
    label) hold at least (2q - 1) / q > 2/3 of the prefix's probability; that share beats the
    rest and every other extension (each below 1 - q) in every case of the recursion. The
    inputs here have q >= 0.8."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        t = int(torch.randint(1, 30, (1,), generator=gen))
        v = int(torch.randint(2, 6, (1,), generator=gen))
        log_probs = peaky_log_probs(gen, t, v, min_peak=0.8)
        nbest = ctc_prefix_beam_search(log_probs, beam_size=1)
        assert len(nbest) == 1
        assert nbest[0][0] == greedy(log_probs)


def test_beam_one_can_differ_from_greedy_when_not_peaky():
    # Frame 2: "b" is the most probable token (0.4), but staying on "a" (blank 0.3 + repeat
    # 0.3) is more probable, and so is the prefix "a" overall (0.555 against 0.36).
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.3, 0.3, 0.4]])
    assert greedy(probs.log()) == [1, 2]
    assert ctc_prefix_beam_search(probs.log(), beam_size=1)[0][0] == [1]
    assert brute_force_prefixes(probs.log())[(1,)] == pytest.approx(math.log(0.555), abs=1e-6)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_top_one_token_per_frame_is_the_greedy_path(beam_size):
    """Pruned to one token per frame, only the best path survives, with its probability."""
    gen = torch.Generator().manual_seed(beam_size)
    for _ in range(50):
        t = int(torch.randint(1, 20, (1,), generator=gen))
        log_probs = random_log_probs(gen, t, 5)
        nbest = ctc_prefix_beam_search(log_probs, beam_size=beam_size, top_k=1)
        assert len(nbest) == 1
        assert nbest[0][0] == greedy(log_probs)
        assert nbest[0][1] == pytest.approx(log_probs.max(-1).values.sum().item(), abs=1e-4)


def test_prefix_beam_search_edge_cases():
    assert ctc_prefix_beam_search(torch.zeros(0, 4), beam_size=3) == [([], 0.0)]
    log_probs = random_log_probs(torch.Generator().manual_seed(3), 6, 4)
    assert len(ctc_prefix_beam_search(log_probs, beam_size=5)) == 5
    with pytest.raises(ValueError, match="beam_size"):
        ctc_prefix_beam_search(log_probs, beam_size=0)
    with pytest.raises(ValueError, match="top_k"):
        ctc_prefix_beam_search(log_probs, beam_size=2, top_k=0)


def encode_one(model: ASRModel, length: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) encoder output and (T, V) CTC log-probabilities of one random utterance."""
    feats, lens = random_batch([length])
    with torch.no_grad():
        enc, enc_lens, _ = model.encoder(feats, lens)
        return enc[0], model.ctc(enc[0]).log_softmax(-1)


def teacher_forced_score(model: ASRModel, enc: torch.Tensor, tokens: list[int]) -> float:
    """Decoder log-probability of ``tokens`` + <sos/eos>, one hypothesis at a time."""
    ys_in = torch.tensor([[model.sos_eos, *tokens]])
    ys_out = torch.tensor([*tokens, model.sos_eos])
    with torch.no_grad():
        logits = model.decoder(
            ys_in, torch.tensor([len(tokens) + 1]), enc[None], torch.tensor([enc.size(0)])
        )
    return logits[0].log_softmax(-1).gather(-1, ys_out[:, None]).sum().item()


def test_attention_rescoring_scores_each_hypothesis_like_one_at_a_time():
    model = tiny_model().eval()
    enc, _ = encode_one(model)
    nbest = [([1, 2, 3], -1.0), ([4], -2.0), ([], -3.0), ([2, 2, 5, 1, 6], -4.0)]
    att = [teacher_forced_score(model, enc, tokens) for tokens, _ in nbest]
    best, scores = attention_rescoring(model, enc, nbest, ctc_weight=0.0)
    assert scores == pytest.approx(att, abs=1e-4)
    assert best == nbest[max(range(4), key=att.__getitem__)][0]
    _, mixed = attention_rescoring(model, enc, nbest, ctc_weight=0.3)
    assert mixed == pytest.approx(
        [0.3 * c + 0.7 * a for (_, c), a in zip(nbest, att, strict=True)], abs=1e-4
    )


def test_attention_rescoring_of_a_ctc_nbest():
    model = tiny_model().eval()
    enc, log_probs = encode_one(model)
    nbest = ctc_prefix_beam_search(log_probs, beam_size=4)
    assert len(nbest) == 4
    # the scores computed here, one hypothesis at a time, not the function's own
    want = [0.5 * c + 0.5 * teacher_forced_score(model, enc, tokens) for tokens, c in nbest]
    best, scores = attention_rescoring(model, enc, nbest, ctc_weight=0.5)
    assert scores == pytest.approx(want, abs=1e-4)
    assert best == nbest[max(range(4), key=want.__getitem__)][0]
    best, scores = attention_rescoring(model, enc, nbest, ctc_weight=1.0)
    assert best == nbest[0][0]
    assert scores == pytest.approx([s for _, s in nbest])


def test_attention_rescoring_errors():
    with pytest.raises(ValueError, match="decoder"):
        attention_rescoring(tiny_model(decoder=False), torch.zeros(5, 16), [([1], 0.0)], 0.5)
    with pytest.raises(ValueError, match="empty"):
        attention_rescoring(tiny_model(), torch.zeros(5, 16), [], 0.5)


def batch_log_probs(model: ASRModel, feats, lens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval().ctc_log_probs(feats, lens)


class DigitTokenizer:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def native(model: ASRModel) -> NativeModel:
    """The model as the pipeline sees it (features already normalised)."""
    return native_model(model, DigitTokenizer(), (torch.zeros(80), torch.ones(80)), Path("."))


def feats_batch(feats: torch.Tensor, lens: torch.Tensor) -> dict:
    return {"feats": feats, "feat_lens": lens}


def decode_batch(model: NativeModel, batch: dict, *args, **kwargs) -> list[list[int]]:
    return model.decode(batch, *args, **kwargs)


def test_decode_batch_methods():
    model = tiny_model()
    feats, lens = random_batch([60, 45, 30])
    log_probs, enc_lens = batch_log_probs(model, feats, lens)
    model.train()
    results = {}
    for method in ("ctc_greedy_search", "ctc_prefix_beam_search", "attention_rescoring"):
        hyps = decode_batch(native(model), feats_batch(feats, lens), method, 4, 0.5)
        assert model.training  # its mode is restored
        assert len(hyps) == 3
        assert all(isinstance(k, int) and 0 < k < VOCAB for h in hyps for k in h)
        results[method] = hyps
    assert results["ctc_greedy_search"] == ctc_greedy_search(log_probs, enc_lens)
    assert results["ctc_prefix_beam_search"] == [
        ctc_prefix_beam_search(log_probs[i, :n], 4, top_k=4)[0][0]
        for i, n in enumerate(enc_lens.tolist())
    ]
    # beam 1 with one token per frame is the greedy path
    batch = feats_batch(feats, lens)
    greedy_beam = decode_batch(native(model), batch, "ctc_prefix_beam_search", beam_size=1)
    assert greedy_beam == results["ctc_greedy_search"]
    # with all the weight on CTC, rescoring keeps the prefix search's best
    ctc_only = decode_batch(native(model), batch, "attention_rescoring", 4, ctc_weight=1.0)
    assert ctc_only == results["ctc_prefix_beam_search"]


def test_decode_batch_errors():
    batch = feats_batch(*random_batch([30]))
    plain, hybrid = native(tiny_model(decoder=False)), native(tiny_model())
    with pytest.raises(ValueError, match="'attention_rescoring' is not available for a native"):
        decode_batch(plain, batch, "attention_rescoring")
    with pytest.raises(ValueError, match="'beam_search' is not available"):
        decode_batch(hybrid, batch, "beam_search")
    with pytest.raises(ValueError, match="beam_size"):
        decode_batch(hybrid, batch, "ctc_prefix_beam_search", beam_size=0)
    with pytest.raises(ValueError, match="ctc_weight"):
        decode_batch(hybrid, batch, "attention_rescoring", ctc_weight=1.5)


def test_decode_set():
    model = tiny_model(decoder=False)
    batches = []
    for seed, lengths in ((1, [50, 40]), (2, [35])):
        feats, lens = random_batch(lengths, seed)
        n = len(lengths)
        batches.append(
            {
                "feats": feats,
                "feat_lens": lens,
                "ids": [f"b{seed}u{i}" for i in range(n)],
                "texts": ["1 2"] * n,
                "seconds": 0.01 * sum(lengths),
            }
        )
    start = time.perf_counter()
    result = decode_set(native(model), batches, "ctc_prefix_beam_search", beam_size=3)
    wall = time.perf_counter() - start
    assert [u["id"] for u in result.utts] == ["b1u0", "b1u1", "b2u0"]
    assert [u["ref"] for u in result.utts] == ["1 2"] * 3
    expected = []  # the prefix beam search on each utterance's own log-probabilities
    for b in batches:
        log_probs, enc_lens = batch_log_probs(model, b["feats"], b["feat_lens"])
        for i, n in enumerate(enc_lens.tolist()):
            tokens = ctc_prefix_beam_search(log_probs[i, :n], 3, top_k=3)[0][0]
            expected.append(DigitTokenizer().decode(tokens))
    assert [u["hyp"] for u in result.utts] == expected
    assert result.audio_seconds == pytest.approx(1.25)  # the batches' seconds, summed
    assert 0 < result.decode_seconds <= wall  # timed inside the call
    assert result.rtf == pytest.approx(result.decode_seconds / 1.25)
    assert result.timing() == {
        "num_utts": 3,
        "audio_seconds": result.audio_seconds,
        "decode_seconds": result.decode_seconds,
        "rtf": result.rtf,
    }
