"""Builders of tiny corpora for the recipe tests, in the real corpora's exact on-disk layouts.

- LibriSpeech: ``<root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` and one
  ``<speaker>-<chapter>.trans.txt`` per chapter; English sentences spoken by espeak-ng.
- AISHELL-1: ``<root>/data_aishell/wav/{train,dev,test}/<speaker>/BAC009<speaker>W<utt>.wav``
  (16 kHz) and ``<root>/data_aishell/transcript/aishell_transcript_v0.8.txt`` (space-separated
  words in Chinese characters). The characters are turned into numbered-tone pinyin and spoken
  by espeak-ng's ``cmn-latn-pinyin`` voice, which reads pinyin as Mandarin syllables.
- Kaldi data directories (``wav.scp``, ``text``, ``utt2spk``, optional ``segments``) over the
  audio of a LibriSpeech-layout corpus.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from comflp.corpus.synth import ACCENTS, VARIANTS, SentenceGenerator, SpeechJob, synthesize_all

SPEAKERS_PER_SUBSET = 2

# --- LibriSpeech ----------------------------------------------------------------------------


def build_librispeech(root: Path, sizes: dict[str, int], seed: int = 0, nj: int = 2) -> Path:
    """Write ``sizes[subset]`` utterances per subset; ids are unique across subsets."""
    jobs: list[SpeechJob] = []
    for subset_index, (subset, size) in enumerate(sizes.items()):
        transcripts: dict[Path, list[str]] = {}
        for i in range(size):
            rng = random.Random(f"{seed}/{subset}/{i}")
            speaker = 100 + 10 * subset_index + i % SPEAKERS_PER_SUBSET
            chapter = 100 * speaker + 1
            utt_id = f"{speaker}-{chapter}-{i:04d}"
            chapter_dir = root / subset / str(speaker) / str(chapter)
            text = SentenceGenerator(rng).sentence()
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
            out = chapter_dir / f"{utt_id}.flac"
            jobs.append(SpeechJob(text, voice, rng.randint(150, 190), 50, out))
            transcripts.setdefault(chapter_dir / f"{speaker}-{chapter}.trans.txt", []).append(
                f"{utt_id} {text}\n"
            )
        for path, lines in transcripts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines))
    synthesize_all(jobs, nj)
    return root


# --- AISHELL-1 ------------------------------------------------------------------------------

# A small fixed vocabulary of common words (subjects, times, verbs, objects).
CHINESE_SUBJECTS = "我们 他们 老师 学生 医生 朋友 妈妈 孩子".split()
CHINESE_TIMES = "今天 明天 昨天 上午 下午 晚上".split()
CHINESE_VERBS = "喜欢 去 看 买 学习 准备 需要 参观".split()
CHINESE_OBJECTS = "北京 学校 医院 公园 电影 苹果 汽车 新闻 市场 图书馆".split()
AISHELL_FIRST_SPEAKER = {"train": 2, "dev": 724, "test": 764}  # as in the real corpus
AISHELL_TRANSCRIPT = "data_aishell/transcript/aishell_transcript_v0.8.txt"


def chinese_sentence(rng: random.Random) -> str:
    """Space-separated words, as in AISHELL-1's transcript."""
    words = [rng.choice(CHINESE_SUBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(CHINESE_TIMES))
    words += [rng.choice(CHINESE_VERBS), rng.choice(CHINESE_OBJECTS)]
    return " ".join(words)


def to_pinyin(text: str) -> str:
    """Numbered-tone pinyin of Chinese text, one syllable per character (``好`` -> ``hao3``)."""
    from pypinyin import Style, lazy_pinyin

    return " ".join(
        lazy_pinyin(text.replace(" ", ""), style=Style.TONE3, neutral_tone_with_five=True)
    )


def aishell_id(subset: str, speaker_offset: int, index: int) -> tuple[str, str]:
    """(speaker, utterance id), e.g. ("S0002", "BAC009S0002W0122")."""
    speaker = f"S{AISHELL_FIRST_SPEAKER[subset] + speaker_offset:04d}"
    return speaker, f"BAC009{speaker}W{121 + index:04d}"


def build_aishell(root: Path, sizes: dict[str, int], seed: int = 0, nj: int = 2) -> Path:
    """Write ``sizes[subset]`` utterances per subset, plus the real corpus's two quirks: one
    training wav has no transcript line and one transcript line has no wav."""
    jobs: list[SpeechJob] = []
    lines = []
    for subset, size in sizes.items():
        for i in range(size + (subset == "train")):
            rng = random.Random(f"{seed}/aishell/{subset}/{i}")
            speaker, utt_id = aishell_id(subset, i % SPEAKERS_PER_SUBSET, i)
            text = chinese_sentence(rng)
            out = root / "data_aishell/wav" / subset / speaker / f"{utt_id}.wav"
            variant = rng.choice(["m1", "m3", "f2", "f4"])
            voice = f"cmn-latn-pinyin+{variant}"
            speed = rng.randint(130, 160)
            jobs.append(SpeechJob(to_pinyin(text), voice, speed, 50, out))
            if i < size:  # the extra training wav has no transcript
                lines.append(f"{utt_id} {text}\n")
    lines.append(f"{aishell_id('train', 0, 999)[1]} 我们 喜欢 北京\n")  # no wav for this one
    transcript = root / AISHELL_TRANSCRIPT
    transcript.parent.mkdir(parents=True, exist_ok=True)
    transcript.write_text("".join(sorted(lines)), encoding="utf-8")
    synthesize_all(jobs, nj)
    return root


# --- Kaldi data directories -----------------------------------------------------------------


def build_kaldi_dir(out_dir: Path, librispeech_subset: Path, segments: bool = False) -> dict:
    """A Kaldi data directory over the utterances of one LibriSpeech-layout subset.

    Without ``segments``: one recording per utterance; even ones are plain paths, odd ones
    ``sox <flac> -t wav - |`` pipes. With ``segments``: consecutive pairs of utterances are
    joined into one 8 kHz WAV recording (every other one read through a pipe) and ``segments``
    cuts them apart again. Returns ``{utterance id: (text, duration)}``.
    """
    import soundfile as sf

    utts = []
    for trans in sorted(librispeech_subset.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            utts.append((utt_id, text, trans.parent / f"{utt_id}.flac"))
    out_dir.mkdir(parents=True, exist_ok=True)
    wav_scp, text_lines, utt2spk, segment_lines, expected = [], [], [], [], {}
    for i, (utt_id, text, flac) in enumerate(utts):
        text_lines.append(f"{utt_id} {text}")
        utt2spk.append(f"{utt_id} {utt_id.split('-')[0]}")
        expected[utt_id] = (text, sf.info(str(flac)).duration)
        if not segments:
            wav_scp.append(f"{utt_id} {flac}" if i % 2 == 0 else f"{utt_id} sox {flac} -t wav - |")
    if segments:
        for n, pair in enumerate(zip(utts[0::2], utts[1::2])):
            rec_id = f"rec{n:03d}"
            joined = out_dir / "audio" / f"{rec_id}.wav"
            joined.parent.mkdir(exist_ok=True)
            subprocess.run(
                ["sox", "-V1", *(str(u[2]) for u in pair), "-r", "8000", str(joined)], check=True
            )
            wav_scp.append(
                f"{rec_id} {joined}" if n % 2 == 0 else f"{rec_id} sox {joined} -t wav - |"
            )
            first = expected[pair[0][0]][1]
            segment_lines.append(f"{pair[0][0]} {rec_id} 0.00 {first:.3f}")
            segment_lines.append(
                f"{pair[1][0]} {rec_id} {first:.3f} {first + expected[pair[1][0]][1]:.3f}"
            )
        expected = {s.split()[0]: expected[s.split()[0]] for s in segment_lines}
        text_lines = [t for t in text_lines if t.split()[0] in expected]
        utt2spk = [u for u in utt2spk if u.split()[0] in expected]
        (out_dir / "segments").write_text("\n".join(segment_lines) + "\n")
    for name, lines in (("wav.scp", wav_scp), ("text", text_lines), ("utt2spk", utt2spk)):
        (out_dir / name).write_text("\n".join(sorted(lines)) + "\n")
    return expected
