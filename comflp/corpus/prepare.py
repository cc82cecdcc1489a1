"""Stage 0: a corpus on disk -> one lhotse CutSet per subset (``data/manifests/cuts_<subset>.jsonl.gz``).

Three kinds of input, each read by lhotse's own preparation: LibriSpeech's layout (also the
built-in corpus), AISHELL-1's layout, and Kaldi data directories (``wav.scp``, ``text``,
``utt2spk``, optional ``segments``). The corpus is checked first, so that a bad directory is
refused with one clear message listing every problem, instead of a decoder traceback half-way
through or a silently shrunken corpus.

Bad utterances are refused, not skipped: a missing or corrupt audio file, an empty transcript
or a failing ``wav.scp`` command usually means a broken download or extraction, and training on
a silently shrunken corpus would make results irreproducible. Fix or remove the utterances
named and run stage 0 again. Two exceptions, both normal in the real corpora and logged with a
count: audio without a transcript is skipped (LibriSpeech, AISHELL-1, as lhotse does), and
AISHELL-1 transcript lines without audio are ignored (its one transcript is a lookup table for
all three subsets: the audio files present define the corpus).
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from lhotse import CutSet

from comflp.errors import InputError
from comflp.utils import atomic_path

MAX_LISTED_PROBLEMS = 20
SAMPLING_RATE = 16000  # what stage 1's fbank expects; other rates are resampled

# LibriSpeech training sets made of several parts: stage 0 writes one combined cut set.
LIBRISPEECH_COMBINED = {"train-960": ("train-clean-100", "train-clean-360", "train-other-500")}
AISHELL_SUBSETS = ("train", "dev", "test")
AISHELL_TRANSCRIPT = "data_aishell/transcript/aishell_transcript_v0.8.txt"
AISHELL_LAYOUT = (
    "<corpus_dir>/data_aishell/wav/{train,dev,test}/<speaker>/<id>.wav and "
    f"<corpus_dir>/{AISHELL_TRANSCRIPT}"
)
# OpenSLR resource of each downloadable corpus and the directory name lhotse extracts it to.
DOWNLOADS = {"librispeech": ("12", "LibriSpeech"), "aishell": ("33", "aishell")}
DEFAULT_DOWNLOAD_URL = "http://www.openslr.org/resources"
KALDI_FILES = ("wav.scp", "text", "utt2spk")
KALDI_LAYOUT = "<corpus_dir>/<subset>/ holding wav.scp, text and utt2spk (segments optional)"
SEGMENT_END_TOLERANCE = 0.05  # seconds a segment may run past the end of its recording


class CorpusError(InputError):
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


def _require_dir(path: Path, what: str, expected: str) -> None:
    if not path.is_dir():
        raise CorpusError(f"{path}: {what} does not exist (expected {expected})")


# --- LibriSpeech ----------------------------------------------------------------------------


def librispeech_parts(subsets: list[str]) -> list[str]:
    """The LibriSpeech directories that ``subsets`` need (``train-960`` needs three)."""
    parts: list[str] = []
    for subset in subsets:
        for part in LIBRISPEECH_COMBINED.get(subset, (subset,)):
            if part not in parts:
                parts.append(part)
    return parts


def check_librispeech_dir(corpus_dir: Path, subsets: list[str], nj: int = 4) -> None:
    """Refuse a directory that is not in LibriSpeech's layout or holds bad utterances."""
    expected = (
        "<corpus_dir>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt and <utt-id>.flac"
    )
    _require_dir(corpus_dir, "corpus directory", expected)
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
        listed = len(audio)
        for trans in transcripts:
            for lineno, line in enumerate(trans.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                if not text.strip():
                    problems.append(f"{trans}:{lineno}: empty transcript for {utt_id}")
                audio.append(trans.parent / f"{utt_id}.flac")
        untranscribed = set(subset_dir.glob("*/*/*.flac")) - set(audio[listed:])
        if untranscribed:
            logging.info(
                f"{subset_dir}: skipping {len(untranscribed)} .flac files without a transcript line"
            )
    problems += _check_audio_files(audio, nj)
    _raise_problems(corpus_dir, problems, "LibriSpeech-layout")


def prepare_librispeech_cuts(corpus_dir: Path, subsets: list[str], nj: int) -> dict[str, CutSet]:
    """Check the directory, then run lhotse's LibriSpeech preparation on it.

    A combined subset (``train-960``) becomes one cut set of all its parts.
    """
    from lhotse.recipes import prepare_librispeech

    parts = librispeech_parts(subsets)
    check_librispeech_dir(corpus_dir, parts, nj)
    manifests = prepare_librispeech(corpus_dir, dataset_parts=parts, num_jobs=nj)
    by_part = {
        part: CutSet.from_manifests(recordings=m["recordings"], supervisions=m["supervisions"])
        for part, m in manifests.items()
    }
    return {
        subset: CutSet.from_cuts(
            cut for part in LIBRISPEECH_COMBINED.get(subset, (subset,)) for cut in by_part[part]
        )
        for subset in subsets
    }


# --- AISHELL-1 ------------------------------------------------------------------------------


def read_aishell_transcript(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{utterance id: text}`` and the problems of the transcript file (empty texts)."""
    texts, problems = {}, []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) == 1:
            problems.append(f"{path}:{lineno}: empty transcript for {fields[0]}")
        texts[fields[0]] = fields[1] if len(fields) > 1 else ""
    return texts, problems


def check_aishell_dir(corpus_dir: Path, subsets: list[str], nj: int = 4) -> None:
    """Refuse a directory that is not in AISHELL-1's layout or holds bad utterances.

    lhotse prepares train, dev and test together, so all three must be there, whichever
    subsets are asked for.
    """
    unknown = [s for s in subsets if s not in AISHELL_SUBSETS]
    if unknown:
        raise CorpusError(
            f"AISHELL-1 subsets are {', '.join(AISHELL_SUBSETS)}; got {', '.join(unknown)} "
            "(set --train_set, --dev_set and --test_sets accordingly)"
        )
    _require_dir(corpus_dir, "corpus directory", AISHELL_LAYOUT)
    transcript = corpus_dir / AISHELL_TRANSCRIPT
    if not transcript.is_file():
        raise CorpusError(f"{transcript}: transcript file missing (expected {AISHELL_LAYOUT})")
    texts, problems = read_aishell_transcript(transcript)
    with_text: list[Path] = []
    found: set[str] = set()
    for subset in AISHELL_SUBSETS:
        wav_dir = corpus_dir / "data_aishell/wav" / subset
        _require_dir(wav_dir, "subset directory", AISHELL_LAYOUT)
        wavs = sorted(wav_dir.rglob("*.wav"))
        transcribed = [w for w in wavs if w.stem in texts]
        if not transcribed:
            raise CorpusError(
                f"{wav_dir}: no .wav file with a line in {transcript} (expected {AISHELL_LAYOUT})"
            )
        if len(transcribed) < len(wavs):
            logging.info(
                f"{wav_dir}: skipping {len(wavs) - len(transcribed)} .wav files without a transcript line"
            )
        with_text += transcribed
        found.update(w.stem for w in wavs)
    without_audio = len(set(texts) - found)
    if without_audio:
        logging.info(f"{transcript}: ignoring {without_audio} lines without a .wav file")
    problems += _check_audio_files(with_text, nj)
    _raise_problems(corpus_dir, problems, "AISHELL-1")


def prepare_aishell_cuts(corpus_dir: Path, subsets: list[str], nj: int) -> dict[str, CutSet]:
    """Check the directory, then run lhotse's AISHELL-1 preparation (which removes the spaces
    between words: Mandarin is scored by characters)."""
    from lhotse.recipes import prepare_aishell

    check_aishell_dir(corpus_dir, subsets, nj)
    manifests = prepare_aishell(corpus_dir)
    return {
        subset: CutSet.from_manifests(
            recordings=manifests[subset]["recordings"],
            supervisions=manifests[subset]["supervisions"],
        )
        for subset in subsets
    }


# --- download -------------------------------------------------------------------------------


def download_corpus(corpus: str, corpus_dir: Path, subsets: list[str], base_url: str) -> None:
    """Download and extract a corpus with lhotse into ``corpus_dir``; lhotse skips the parts it
    completed before (its ``.completed`` markers). lhotse extracts into ``<parent>/LibriSpeech``
    or ``<parent>/aishell``, so ``corpus_dir`` must end with that name."""
    from lhotse.recipes import download_aishell, download_librispeech

    if corpus not in DOWNLOADS:
        raise CorpusError(
            f"--download true: lhotse can download {' or '.join(DOWNLOADS)}, not {corpus}"
        )
    resource, name = DOWNLOADS[corpus]
    if corpus_dir.name != name:
        raise CorpusError(
            f"--corpus_dir {corpus_dir}: with --download true it must end with /{name} "
            f"(lhotse extracts {corpus} into <download dir>/{name})"
        )
    target = corpus_dir.parent
    parts = librispeech_parts(subsets) if corpus == "librispeech" else []
    if parts:
        what = ", ".join(f"{base_url}/{resource}/{part}.tar.gz" for part in parts)
    else:
        what = f"{base_url}/{resource}/data_aishell.tgz and resource_aishell.tgz"
    existing = set(target.glob("*.t*gz")) if target.is_dir() else set()
    logging.info(f"downloading {what} into {target}")
    try:
        if corpus == "librispeech":
            download_librispeech(target, dataset_parts=parts, base_url=base_url)
        else:
            download_aishell(target, base_url=base_url)
    except (OSError, tarfile.TarError, EOFError) as e:
        for partial in set(target.glob("*.t*gz")) - existing:
            if partial.stat().st_size == 0:
                partial.unlink()
        raise CorpusError(
            f"could not download {what} into {target} ({type(e).__name__}: {e}); check the "
            "network, try a mirror with --download_url, or download and extract the corpus by "
            f"hand into {corpus_dir} and run with --download false"
        ) from None


# --- Kaldi data directories -----------------------------------------------------------------


def read_kaldi_table(path: Path, problems: list[str]) -> dict[str, str]:
    """``{first field: rest of the line}`` of a Kaldi text table; duplicate keys are problems."""
    table: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if fields[0] in table:
            problems.append(f"{path}:{lineno}: {fields[0]} listed twice")
        table[fields[0]] = fields[1].strip() if len(fields) > 1 else ""
    return table


@dataclass
class AudioProbe:
    """What reading one ``wav.scp`` entry found."""

    problem: str | None = None
    rate: int = 0
    duration: float = 0.0
    channels: int = 0


def probe_wav_entry(entry: str) -> AudioProbe:
    """Read one ``wav.scp`` entry, a path or a command ending in ``|`` (run with the shell, as
    lhotse runs it)."""
    if not entry.endswith("|"):
        problem = audio_problem(Path(entry))
        if problem:
            return AudioProbe(problem)
        info = sf.info(entry)
        return AudioProbe(None, info.samplerate, info.frames / info.samplerate, info.channels)
    command = entry[:-1].strip()
    proc = subprocess.run(command, shell=True, capture_output=True)
    if proc.returncode != 0:
        error = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = f"exit status {proc.returncode}" + (f": {error[-1]}" if error else "")
        return AudioProbe(f"command `{command}` failed ({reason})")
    try:
        data, rate = sf.read(io.BytesIO(proc.stdout), always_2d=True)
    except Exception as e:  # soundfile raises several types for unreadable data
        return AudioProbe(f"output of `{command}` is not audio ({e})")
    if len(data) == 0:
        return AudioProbe(f"`{command}` produced no samples")
    return AudioProbe(None, rate, len(data) / rate, data.shape[1])


def kaldi_utterances(data_dir: Path, problems: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``{utterance: recording}`` and the ``wav.scp`` table of a Kaldi data directory; missing
    or inconsistent entries are added to ``problems``."""
    wav_scp = read_kaldi_table(data_dir / "wav.scp", problems)
    texts = read_kaldi_table(data_dir / "text", problems)
    utt2spk = read_kaldi_table(data_dir / "utt2spk", problems)
    segments_path = data_dir / "segments"
    if segments_path.is_file():
        uses = {}
        for utt, fields in read_kaldi_table(segments_path, problems).items():
            if len(fields.split()) == 3:
                uses[utt] = fields.split()[0]
            else:
                problems.append(
                    f"{segments_path}: {utt}: expected '<utt-id> <recording-id> <start> <end>'"
                )
    else:
        uses = {utt: utt for utt in utt2spk}
        problems += [
            f"{data_dir}/wav.scp: {r} has no line in utt2spk" for r in wav_scp if r not in utt2spk
        ]
    for utt, rec in uses.items():
        if rec not in wav_scp:
            problems.append(f"{data_dir}/wav.scp: no line for {rec} (used by utterance {utt})")
        if utt not in utt2spk:
            problems.append(f"{data_dir}/utt2spk: no line for utterance {utt}")
        if not texts.get(utt):
            problems.append(f"{data_dir}/text: empty or missing transcript for {utt}")
    problems += [
        f"{data_dir}/text: {u} is not an utterance of this directory"
        for u in texts
        if u not in uses
    ]
    return uses, wav_scp


def check_kaldi_dir(data_dir: Path, nj: int) -> tuple[list[str], dict[str, float], int]:
    """Problems of one Kaldi data directory, the durations of the recordings its utterances
    use, and their sampling rate.

    Each of those recordings is read once (its command run once), so that a missing file or a
    failing command is found here, named with its id, rather than in stage 1.
    """
    missing = [name for name in KALDI_FILES if not (data_dir / name).is_file()]
    if missing:
        raise CorpusError(f"{data_dir}: {', '.join(missing)} missing (expected {KALDI_LAYOUT})")
    problems: list[str] = []
    uses, wav_scp = kaldi_utterances(data_dir, problems)
    recordings = sorted({r for r in uses.values() if r in wav_scp})
    with ThreadPoolExecutor(max(1, nj)) as pool:
        probes = dict(zip(recordings, pool.map(probe_wav_entry, (wav_scp[r] for r in recordings))))
    where = data_dir / "wav.scp"
    problems += [f"{where}: {r}: {p.problem}" for r, p in probes.items() if p.problem]
    good = {r: p for r, p in probes.items() if not p.problem}
    problems += [
        f"{where}: {r}: {p.channels} channels; expected mono audio"
        for r, p in good.items()
        if p.channels != 1
    ]
    rates = Counter(p.rate for p in good.values())
    if len(rates) > 1:
        counts = ", ".join(f"{n} at {rate} Hz" for rate, n in rates.most_common())
        problems.append(
            f"{where}: recordings with different sampling rates ({counts}); a Kaldi data directory holds one rate"
        )
    durations = {r: p.duration for r, p in good.items()}
    if (data_dir / "segments").is_file():
        segments = read_kaldi_table(data_dir / "segments", [])
        for utt, fields in segments.items():
            problems += _segment_problems(data_dir / "segments", utt, fields.split(), durations)
    return problems, durations, rates.most_common(1)[0][0] if rates else SAMPLING_RATE


def _segment_problems(
    path: Path, utt: str, fields: list[str], durations: dict[str, float]
) -> list[str]:
    """Problems of one ``segments`` line (``fields``: recording, start, end; an end of -1 is
    the end of the recording). Lines with a bad recording were reported already."""
    if len(fields) != 3 or fields[0] not in durations:
        return []
    rec, start_text, end_text = fields
    try:
        start, end = float(start_text), float(end_text)
    except ValueError:
        return [f"{path}: {utt}: start and end must be numbers, got {start_text} {end_text}"]
    end = durations[rec] if end == -1 else end
    if not 0 <= start < end:
        return [f"{path}: {utt}: expected 0 <= start < end, got {start_text} {end_text}"]
    if end > durations[rec] + SEGMENT_END_TOLERANCE:
        return [f"{path}: {utt}: ends at {end} s, after the end of {rec} ({durations[rec]:.3f} s)"]
    return []


def prepare_kaldi_cuts(corpus_dir: Path, subsets: list[str], nj: int) -> dict[str, CutSet]:
    """Check ``<corpus_dir>/<subset>`` for each subset, then import each with lhotse's Kaldi
    import; one cut per utterance, resampled to 16 kHz when needed."""
    from lhotse.kaldi import load_kaldi_data_dir

    _require_dir(corpus_dir, "corpus directory", KALDI_LAYOUT)
    checked, problems = {}, []
    for subset in subsets:
        _require_dir(corpus_dir / subset, "Kaldi data directory", KALDI_LAYOUT)
        subset_problems, durations, rate = check_kaldi_dir(corpus_dir / subset, nj)
        problems += subset_problems
        checked[subset] = durations, rate
    _raise_problems(corpus_dir, problems, "Kaldi-format")
    cuts_by_subset = {}
    for subset, (durations, rate) in checked.items():
        with tempfile.TemporaryDirectory() as tmp:
            # A copy (the user's directory is only read) holding the recordings utterances use,
            # with the durations measured above as reco2dur.
            for name in ("text", "utt2spk", "segments", "spk2gender", "utt2lang"):
                if (corpus_dir / subset / name).is_file():
                    shutil.copy(corpus_dir / subset / name, tmp)
            wav_scp = read_kaldi_table(corpus_dir / subset / "wav.scp", [])
            Path(tmp, "wav.scp").write_text("".join(f"{r} {wav_scp[r]}\n" for r in durations))
            Path(tmp, "reco2dur").write_text("".join(f"{r} {d}\n" for r, d in durations.items()))
            recordings, supervisions, _ = load_kaldi_data_dir(tmp, sampling_rate=rate, num_jobs=nj)
        cuts = CutSet.from_manifests(recordings=recordings, supervisions=supervisions)
        cuts = cuts.trim_to_supervisions(keep_overlapping=False).to_eager()
        if rate != SAMPLING_RATE:
            logging.info(f"{corpus_dir / subset}: resampling {rate} Hz audio to {SAMPLING_RATE} Hz")
            cuts = cuts.resample(SAMPLING_RATE)
        cuts_by_subset[subset] = cuts
    return cuts_by_subset


# --- output ---------------------------------------------------------------------------------


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
