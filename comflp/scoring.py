"""Error rates with jiwer: WER over words, CER over characters, ESPnet-style counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jiwer


@dataclass
class ErrorStats:
    """Counts of one scored set, as the columns of an ESPnet RESULTS table."""

    snt: int  # sentences
    wrd: int  # reference units (words or characters)
    corr: int
    sub: int
    dele: int
    ins: int
    sent_err: int  # sentences with at least one error

    @property
    def err(self) -> float:
        """Error rate in percent; insertions against an empty reference count as 100% each."""
        errors = self.sub + self.dele + self.ins
        if self.wrd == 0:
            return 100.0 * errors if errors else 0.0
        return 100.0 * errors / self.wrd

    def to_dict(self) -> dict:
        return {**asdict(self), "err": self.err}


def split_units(text: str, unit: str) -> list[str]:
    """Words, or characters; Mandarin text has no spaces, English keeps them as characters."""
    if unit == "word":
        return text.split()
    if unit == "char":
        return list(" ".join(text.split()))
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def error_stats(refs: list[str], hyps: list[str], unit: str) -> ErrorStats:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return ErrorStats(0, 0, 0, 0, 0, 0, 0)
    ref_units = [split_units(r, unit) for r in refs]
    hyp_units = [split_units(h, unit) for h in hyps]
    # jiwer aligns lists of tokens when given space-joined tokens; map units to
    # placeholder words so that characters (including spaces) align one to one.
    vocab: dict[str, str] = {}

    def encode(units: list[str]) -> str:
        return " ".join(vocab.setdefault(u, f"u{len(vocab)}") for u in units)

    out = jiwer.process_words([encode(u) for u in ref_units], [encode(u) for u in hyp_units])
    sent_err = sum(r != h for r, h in zip(ref_units, hyp_units))
    return ErrorStats(
        snt=len(refs),
        wrd=sum(len(u) for u in ref_units),
        corr=out.hits,
        sub=out.substitutions,
        dele=out.deletions,
        ins=out.insertions,
        sent_err=sent_err,
    )
