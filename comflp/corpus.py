"""Stage 0: a corpus on disk -> one lhotse CutSet per subset (``data/manifests/cuts_<subset>.jsonl.gz``).

The corpus is checked before lhotse's own preparation runs, so that a bad directory is refused
with one clear message listing every problem, instead of a decoder traceback half-way through.
Bad utterances are refused, not skipped: a corrupt file or an empty transcript in a corpus
usually means a broken download or extraction, and training on a silently shrunken corpus
would make results irreproducible. Fix or remove the files named and run stage 0 again.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf
from lhotse import CutSet

from comflp.utils import atomic_path

MAX_LISTED_PROBLEMS = 20


class CorpusError(ValueError):
    """A corpus directory that cannot be prepared."""


def audio_problem(path: Path) -> str | None:
    """Why ``path`` is not usable audio, or None when it is."""
    if not path.is_file():
        return f"{path}: audio file missing"
    if path.stat().st_size == 0:
        return f"{path}: audio file is empty (0 bytes)"
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types for unreadable data
        return f"{path}: not readable as audio ({e})"
    if info.frames == 0:
        return f"{path}: audio has no samples"
    return None


def _raise_problems(corpus_dir: Path, problems: list[str], layout: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = (
        f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
        if len(problems) > MAX_LISTED_PROBLEMS
        else ""
    )
    raise CorpusError(
        f"{corpus_dir}: {len(problems)} problem(s) in this {layout} corpus; fix or remove "
        f"these utterances and run stage 0 again:\n  {shown}{more}"
    )


def _check_audio_files(paths: list[Path], nj: int) -> list[str]:
    with ThreadPoolExecutor(max(1, nj)) as pool:
        return [p for p in pool.map(audio_problem, paths) if p]


def check_librispeech_dir(corpus_dir: Path, subsets: list[str], nj: int = 4) -> None:
    """Refuse a directory that is not in LibriSpeech's layout or holds bad utterances."""
    expected = (
        "<corpus_dir>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt and <utt-id>.flac"
    )
    if not corpus_dir.is_dir():
        raise CorpusError(f"{corpus_dir}: corpus directory does not exist (expected {expected})")
    problems: list[str] = []
    audio: list[Path] = []
    for subset in subsets:
        subset_dir = corpus_dir / subset
        if not subset_dir.is_dir():
            found = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir())
            raise CorpusError(
                f"{subset_dir}: subset directory missing (expected {expected}; "
                f"subdirectories found: {', '.join(found) or 'none'})"
            )
        transcripts = sorted(subset_dir.glob("*/*/*.trans.txt"))
        if not transcripts:
            raise CorpusError(f"{subset_dir}: no *.trans.txt files (expected {expected})")
        for trans in transcripts:
            for lineno, line in enumerate(trans.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                if not text.strip():
                    problems.append(f"{trans}:{lineno}: empty transcript for {utt_id}")
                audio.append(trans.parent / f"{utt_id}.flac")
    problems += _check_audio_files(audio, nj)
    _raise_problems(corpus_dir, problems, "LibriSpeech-layout")


def prepare_librispeech_cuts(corpus_dir: Path, subsets: list[str], nj: int) -> dict[str, CutSet]:
    """Check the directory, then run lhotse's LibriSpeech preparation on it."""
    from lhotse.recipes import prepare_librispeech

    check_librispeech_dir(corpus_dir, subsets, nj)
    manifests = prepare_librispeech(corpus_dir, dataset_parts=subsets, num_jobs=nj)
    return {
        subset: CutSet.from_manifests(recordings=m["recordings"], supervisions=m["supervisions"])
        for subset, m in manifests.items()
    }


def write_cuts(cuts_by_subset: dict[str, CutSet], out_dir: Path) -> None:
    """Write ``cuts_<subset>.jsonl.gz`` for each subset, each atomically.

    Every cut holds one utterance; its id becomes the utterance (supervision) id.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for subset, cuts in cuts_by_subset.items():
        cuts = CutSet.from_cuts(
            c.with_id(c.supervisions[0].id) for c in cuts
        ).sort_by_recording_id()
        with atomic_path(out_dir / f"cuts_{subset}.jsonl.gz") as tmp:
            cuts.to_file(tmp)
        logging.info(
            f"{out_dir}/cuts_{subset}.jsonl.gz: {len(cuts)} utterances, {cuts_duration(cuts) / 3600:.2f} h"
        )


def cuts_duration(cuts: CutSet) -> float:
    return sum(c.duration for c in cuts)
