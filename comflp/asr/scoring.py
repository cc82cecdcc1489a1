"""Error rates with jiwer: WER over words, CER over characters, ESPnet-style counts, results
tables and per-utterance alignments."""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer

from comflp.expdir import ALIGNMENT, HYP_TEXT, REF_TEXT, SCORE_TABLE, SCORES
from comflp.utils import atomic_write_json, atomic_write_text

# jiwer's alignment chunk types -> the marks of an alignment (correct, substitution, ...)
MARKS = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}
# Scored metric -> unit
METRIC_UNITS = {"wer": "word", "cer": "char"}
TABLE_HEADER = ("dataset", "Snt", "Wrd", "Corr", "Sub", "Del", "Ins", "Err", "S.Err")
SPACE_SHOWN_AS = "<sp>"  # a space unit of a character alignment

# One aligned position: (mark, reference unit, hypothesis unit); "" for the side a deletion
# or an insertion lacks.
Position = tuple[str, str, str]


def _percent(count: int, total: int) -> float:
    """``count`` in percent of ``total``; against a zero total each count is 100%."""
    if total == 0:
        return 100.0 * count
    return 100.0 * count / total


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
        return _percent(self.sub + self.dele + self.ins, self.wrd)

    def to_dict(self) -> dict:
        return {**asdict(self), "err": self.err}


def split_units(text: str, unit: str) -> list[str]:
    """Words, or characters; Mandarin text has no spaces, English keeps them as characters."""
    if unit == "word":
        return text.split()
    if unit == "char":
        return list(" ".join(text.split()))
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def align(refs: list[list[str]], hyps: list[list[str]]) -> list[list[Position]]:
    """Align each reference's units with its hypothesis's, with jiwer (one call for the set).

    jiwer aligns space-separated words, so every unit (a character may be a space) is mapped
    to a placeholder word first. Pairs with an empty reference (which older jiwer versions
    reject) are not given to jiwer: each of their hypothesis units is an insertion.
    """
    vocab: dict[str, str] = {}

    def encode(units: list[str]) -> str:
        return " ".join(vocab.setdefault(u, f"u{len(vocab)}") for u in units)

    aligned: list[list[Position]] = [[("I", "", u) for u in hyp] for hyp in hyps]
    scored = [i for i, ref in enumerate(refs) if ref]
    if scored:
        out = jiwer.process_words(
            [encode(refs[i]) for i in scored], [encode(hyps[i]) for i in scored]
        )
        for i, chunks in zip(scored, out.alignments, strict=True):
            aligned[i] = [pos for chunk in chunks for pos in _positions(chunk, refs[i], hyps[i])]
    return aligned


def _positions(chunk, ref: list[str], hyp: list[str]) -> list[Position]:
    """The aligned positions of one jiwer alignment chunk."""
    mark = MARKS[chunk.type]
    ref_units = ref[chunk.ref_start_idx : chunk.ref_end_idx]
    hyp_units = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
    if mark == "D":
        return [("D", u, "") for u in ref_units]
    if mark == "I":
        return [("I", "", u) for u in hyp_units]
    return [(mark, r, h) for r, h in zip(ref_units, hyp_units, strict=True)]


def error_stats(refs: list[str], hyps: list[str], unit: str) -> ErrorStats:
    """Counts of correct, substituted, deleted and inserted units over a set of sentences.

    Empty references and hypotheses are allowed: an empty reference makes every hypothesis
    unit an insertion, and an empty reference with an empty hypothesis counts nothing.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ref_units = [split_units(r, unit) for r in refs]
    aligned = align(ref_units, [split_units(h, unit) for h in hyps])
    marks = Counter(mark for positions in aligned for mark, _, _ in positions)
    return ErrorStats(
        snt=len(refs),
        wrd=sum(len(u) for u in ref_units),
        corr=marks["C"],
        sub=marks["S"],
        dele=marks["D"],
        ins=marks["I"],
        sent_err=sum(any(mark != "C" for mark, _, _ in positions) for positions in aligned),
    )


def scores_table(rows: list[tuple[str, ErrorStats]]) -> str:
    """ESPnet-style Markdown table; Corr..Err in percent of Wrd, S.Err in percent of Snt."""
    lines = [_table_row(TABLE_HEADER), _table_row(("---",) * len(TABLE_HEADER))]
    for name, s in rows:
        percents = [_percent(n, s.wrd) for n in (s.corr, s.sub, s.dele, s.ins)]
        percents += [s.err, _percent(s.sent_err, s.snt)]
        lines.append(_table_row((name, str(s.snt), str(s.wrd), *(f"{p:.1f}" for p in percents))))
    return "\n".join(lines) + "\n"


def _table_row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def alignment_text(utts: list[dict], unit: str) -> str:
    """Per utterance (dicts with ``id``, ``ref``, ``hyp``): its id, the ``ref:``, ``hyp:`` and
    ``op:`` (C/S/D/I) lines with the units in aligned columns (``*`` fills the side a
    deletion or an insertion lacks), and its counts."""
    refs = [split_units(u["ref"], unit) for u in utts]
    hyps = [split_units(u["hyp"], unit) for u in utts]
    return "\n".join(
        _alignment_block(utt["id"], positions)
        for utt, positions in zip(utts, align(refs, hyps), strict=True)
    )


def _alignment_block(utt_id: str, positions: list[Position]) -> str:
    columns = [(_shown(ref), _shown(hyp), mark) for mark, ref, hyp in positions]
    widths = [max(_display_width(cell) for cell in column) for column in columns]

    def line(label: str, row: int) -> str:
        cells = (_fill(column[row], width) for column, width in zip(columns, widths, strict=True))
        return (label + " ".join(cells)).rstrip()

    marks = Counter(mark for mark, _, _ in positions)
    counts = " ".join(f"{m}={marks[m]}" for m in MARKS.values())
    return (
        "\n".join([f"id: {utt_id}", line("ref: ", 0), line("hyp: ", 1), line("op:  ", 2), counts])
        + "\n"
    )


def _shown(unit: str) -> str:
    return SPACE_SHOWN_AS if unit == " " else unit


def _display_width(text: str) -> int:
    """Terminal columns: wide (e.g. CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _fill(cell: str, width: int) -> str:
    """``cell`` padded to ``width`` columns; an empty cell becomes a run of ``*``."""
    if not cell:
        return "*" * width
    return cell + " " * (width - _display_width(cell))


def _kaldi_text(utts: list[dict], key: str) -> str:
    return "".join(f"{u['id']} {u[key]}".rstrip() + "\n" for u in utts)


def write_scores(
    out_dir: str | Path, name: str, utts: list[dict], info: dict | None = None
) -> dict[str, ErrorStats]:
    """Score decoded utterances (dicts with ``id``, ``ref``, ``hyp``) and write into ``out_dir``:

    - ``ref.txt``, ``hyp.txt``: ``id text`` per line (Kaldi text format);
    - ``alignment.word.txt``, ``alignment.char.txt``: see :func:`alignment_text`;
    - ``result.md``: a WER and a CER table, one row named ``name``;
    - ``scores.json``: ``name``, the entries of ``info`` (e.g. decoding options, RTF), and
      ``wer`` and ``cer`` as :meth:`ErrorStats.to_dict`.

    Returns ``{"wer": ..., "cer": ...}``.
    """
    out_dir = Path(out_dir)
    refs, hyps = [u["ref"] for u in utts], [u["hyp"] for u in utts]
    stats = {metric: error_stats(refs, hyps, unit) for metric, unit in METRIC_UNITS.items()}
    atomic_write_text(out_dir / REF_TEXT, _kaldi_text(utts, "ref"))
    atomic_write_text(out_dir / HYP_TEXT, _kaldi_text(utts, "hyp"))
    for unit in METRIC_UNITS.values():
        atomic_write_text(out_dir / ALIGNMENT.format(unit=unit), alignment_text(utts, unit))
    tables = [f"## {metric.upper()}\n\n{scores_table([(name, s)])}" for metric, s in stats.items()]
    atomic_write_text(out_dir / SCORE_TABLE, "\n".join(tables))
    atomic_write_json(
        out_dir / SCORES,
        {"name": name, **(info or {}), **{metric: s.to_dict() for metric, s in stats.items()}},
    )
    return stats
