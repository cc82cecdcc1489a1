"""The built-in corpus: seeded English sentences spoken by espeak-ng, in LibriSpeech's layout.

``<root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` plus one
``<speaker>-<chapter>.trans.txt`` per chapter, 16 kHz mono FLAC, upper-case transcripts, so
that lhotse's LibriSpeech preparation reads it as it reads the real corpus.

Every utterance is drawn from its own generator seeded by (seed, subset, index): the same
seed gives the same corpus whatever the number of parallel jobs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lhotse.augmentation.resample import Resample
from tqdm import tqdm

from comflp.utils import atomic_path, atomic_write_text

# --- text ---------------------------------------------------------------------------------

NAMES = "JOHN MARY PETER ANNA DAVID SARAH THOMAS LUCY JAMES EMMA HENRY ALICE GEORGE CLARA ROBERT".split()
PRONOUNS = "HE SHE THEY WE I YOU".split()
ADJECTIVES = (
    "OLD YOUNG SMALL LARGE QUIET BRIGHT DARK COLD WARM HEAVY LIGHT STRANGE GENTLE ANGRY HAPPY "
    "TIRED CAREFUL FAMOUS HUNGRY PATIENT WOODEN GOLDEN SILVER EMPTY FULL CLEAN NARROW WIDE "
    "DISTANT ANCIENT SIMPLE BUSY CLEVER HONEST LONELY PROUD RAPID SILENT SMOOTH STEEP"
).split()
COLOURS = "RED BLUE GREEN WHITE BLACK BROWN GREY YELLOW".split()
NOUNS = (
    "MAN WOMAN CHILD DOCTOR TEACHER FARMER SAILOR SOLDIER KING QUEEN STRANGER FRIEND NEIGHBOUR "
    "HORSE DOG CAT BIRD FISH WOLF HOUSE GARDEN RIVER BRIDGE ROAD FOREST MOUNTAIN VILLAGE CITY "
    "CASTLE CHURCH MARKET STATION HARBOUR SHIP BOAT TRAIN CART WAGON LETTER BOOK MAP KEY DOOR "
    "WINDOW TABLE CHAIR LAMP CANDLE BOTTLE BASKET BOX COAT HAT SHOE RING COIN SWORD STONE TREE "
    "FLOWER APPLE BREAD CHEESE WATER WINE MILK FIRE SNOW RAIN WIND STORM CLOUD STAR MOON SUN "
    "FIELD HILL VALLEY ISLAND LAKE SHORE TOWER WALL GATE ROOM KITCHEN LIBRARY SCHOOL OFFICE "
    "PICTURE SONG STORY MESSAGE PRESENT BLANKET LADDER HAMMER ROPE NEEDLE MIRROR CLOCK"
).split()
VERBS_PAST = (
    "FOUND CARRIED OPENED CLOSED WATCHED PAINTED BUILT BOUGHT SOLD BROKE FIXED FOLLOWED "
    "HELPED CALLED MET SAW HEARD KNEW LEFT TOOK GAVE SENT BROUGHT HID CAUGHT DREW WROTE "
    "READ LOST WON MOVED PUSHED PULLED CLEANED CHECKED COUNTED DROPPED LIFTED FILLED "
    "WASHED MENDED"
).split()
VERBS_INTRANSITIVE = (
    "WALKED RAN WAITED SLEPT LAUGHED SANG DANCED STOOD SAT ARRIVED STAYED RESTED "
    "SPOKE LISTENED SMILED WORKED TRAVELLED RETURNED SHOUTED WHISPERED"
).split()
VERBS_BASE = (
    "FIND CARRY OPEN CLOSE WATCH PAINT BUILD BUY SELL FIX FOLLOW HELP CALL MEET SEE HEAR "
    "TAKE GIVE SEND BRING HIDE CATCH DRAW WRITE READ MOVE PUSH PULL CLEAN CHECK COUNT LIFT"
).split()
PREPOSITIONS = (
    "NEAR BEHIND UNDER ABOVE BESIDE ACROSS THROUGH INSIDE OUTSIDE AROUND BEYOND TOWARDS".split()
)
ADVERBS = "SLOWLY QUICKLY QUIETLY CAREFULLY SUDDENLY GENTLY LOUDLY HAPPILY SADLY EARLY LATE TOGETHER".split()
TIMES = (
    "YESTERDAY|THIS MORNING|LAST NIGHT|IN THE EVENING|AT NOON|ON MONDAY|ON FRIDAY|IN THE SPRING|"
    "IN THE WINTER|AFTER DINNER|BEFORE SUNRISE|LAST WEEK|TWO DAYS AGO|EVERY SUMMER"
).split("|")
NUMBERS = "TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE TWENTY FIFTY HUNDRED".split()
WH_WORDS = "WHERE WHY WHEN HOW".split()
CONNECTIVES = "AND BUT SO BECAUSE WHILE".split()


def vocabulary() -> set[str]:
    """Every word the generator can produce."""
    words: set[str] = set()
    for group in (
        NAMES,
        PRONOUNS,
        ADJECTIVES,
        COLOURS,
        NOUNS,
        VERBS_PAST,
        VERBS_INTRANSITIVE,
        VERBS_BASE,
        PREPOSITIONS,
        ADVERBS,
        NUMBERS,
        WH_WORDS,
        CONNECTIVES,
    ):
        words.update(group)
    for phrase in TIMES:
        words.update(phrase.split())
    words.update(plural(n) for n in NOUNS)
    words.update("THE A AN DID NOT WILL CAN COULD WAS VERY".split())
    return words


IRREGULAR_PLURALS = {
    "MAN": "MEN",
    "WOMAN": "WOMEN",
    "CHILD": "CHILDREN",
    "FISH": "FISH",
    "WOLF": "WOLVES",
}


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("S", "X", "CH", "SH")):
        return noun + "ES"
    if noun.endswith("Y") and noun[-2] not in "AEIOU":
        return noun[:-1] + "IES"
    return noun + "S"


def with_article(article: str, phrase: str) -> str:
    if article == "A" and phrase[0] in "AEIOU":
        article = "AN"
    return f"{article} {phrase}"


class SentenceGenerator:
    """Varied sentences from a small grammar over a vocabulary of a few hundred words."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def _pick(self, words: list[str]) -> str:
        return self.rng.choice(words)

    def noun_phrase(self) -> str:
        r = self.rng.random()
        if r < 0.15:
            return self._pick(NAMES)
        det = self._pick(["THE", "THE", "A"])
        if r < 0.45:
            return with_article(det, self._pick(NOUNS))
        if r < 0.8:
            return with_article(det, f"{self._pick(ADJECTIVES)} {self._pick(NOUNS)}")
        if r < 0.9:
            return with_article(det, f"{self._pick(COLOURS)} {self._pick(NOUNS)}")
        return f"{self._pick(NUMBERS)} {self._pick(ADJECTIVES)} {plural(self._pick(NOUNS))}"

    def subject(self) -> str:
        return self._pick(PRONOUNS) if self.rng.random() < 0.25 else self.noun_phrase()

    def place(self) -> str:
        return f"{self._pick(PREPOSITIONS)} {self.noun_phrase()}"

    def clause(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            words = [self.subject(), self._pick(VERBS_PAST), self.noun_phrase()]
        elif r < 0.7:
            words = [self.subject(), self._pick(VERBS_INTRANSITIVE)]
            if self.rng.random() < 0.5:
                words.append(self._pick(ADVERBS))
        elif r < 0.85:
            modal = self._pick(["WILL", "CAN", "COULD", "DID NOT"])
            words = [self.subject(), modal, self._pick(VERBS_BASE), self.noun_phrase()]
        else:
            words = [self.noun_phrase(), self._pick(["WAS", "WAS VERY"]), self._pick(ADJECTIVES)]
        if self.rng.random() < 0.4:
            words.append(self.place())
        if self.rng.random() < 0.25:
            words.append(self._pick(TIMES))
        return " ".join(words)

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.1:
            text = f"{self._pick(WH_WORDS)} DID {self.subject()} {self._pick(VERBS_BASE)} {self.noun_phrase()}"
        elif r < 0.3:
            text = f"{self.clause()} {self._pick(CONNECTIVES)} {self.clause()}"
        else:
            text = self.clause()
        return " ".join(text.split())


# --- voices ---------------------------------------------------------------------------------

ACCENTS = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt"]


@dataclass(frozen=True)
class Utterance:
    subset: str
    index: int
    speaker: int
    chapter: int
    voice: str
    speed: int  # words per minute
    pitch: int  # 0..99
    text: str

    @property
    def utt_id(self) -> str:
        return f"{self.speaker}-{self.chapter}-{self.index:04d}"

    def audio_path(self, root: Path) -> Path:
        return root / self.subset / str(self.speaker) / str(self.chapter) / f"{self.utt_id}.flac"


def plan_utterance(seed: int, subset: str, index: int) -> Utterance:
    """Text, voice, speed and pitch of one utterance, from its own seeded generator."""
    rng = random.Random(f"{seed}/{subset}/{index}")
    text = SentenceGenerator(rng).sentence()
    accent = rng.randrange(len(ACCENTS))
    variant = rng.randrange(len(VARIANTS))
    speaker = 100 + accent * len(VARIANTS) + variant  # one "speaker" per voice
    chapter = 1000 + sorted(SUBSET_ROLES).index(subset) if subset in SUBSET_ROLES else 1000
    return Utterance(
        subset=subset,
        index=index,
        speaker=speaker,
        chapter=chapter,
        voice=f"{ACCENTS[accent]}+{VARIANTS[variant]}",
        speed=rng.randint(140, 200),
        pitch=rng.randint(25, 75),
        text=text,
    )


# LibriSpeech subset names that lhotse's preparation accepts, by role.
SUBSET_ROLES = {"train-clean-100": "train", "dev-clean": "dev", "test-clean": "test"}


def check_tools() -> None:
    """Raise RuntimeError naming what to install when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "espeak-ng not found on PATH; the built-in corpus needs it. Install with: "
            "sudo apt-get install espeak-ng (utils/setup.sh does this when run as root)"
        )


# --- audio ----------------------------------------------------------------------------------

SAMPLE_RATE = 16000
# Leading and trailing silence is cut: a 10 ms frame is silent when its RMS is below this
# fraction of full scale; 50 ms of silence is kept at each end.
SILENCE_RMS = 0.005
KEEP_SILENCE = 0.05


@lru_cache(maxsize=4)
def _resampler(rate: int) -> Resample:
    return Resample(rate, SAMPLE_RATE)


def speak(text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
    """Synthesise ``text`` with espeak-ng (``voice`` e.g. ``en-us+m3``, ``speed`` in words per
    minute, ``pitch`` 0-99) into a 16 kHz mono 16-bit FLAC or WAV at ``out`` (by its suffix),
    leading and trailing silence cut. The same arguments give the same file; the file is
    written atomically. Safe to call from several threads."""
    espeak = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(espeak, check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32") if wav else (np.zeros(0), SAMPLE_RATE)
    if rate != SAMPLE_RATE and audio.size:
        audio = _resampler(rate)(torch.from_numpy(audio)[None])[0].numpy()
    audio = trim_silence(audio)
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {out.name}: {text!r}")
    with atomic_path(out) as tmp:
        sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")


def trim_silence(audio: np.ndarray) -> np.ndarray:
    """Cut the silent 10 ms frames at both ends, keeping ``KEEP_SILENCE`` seconds of each end
    (padded with zeros where the signal has less). All-silent audio comes back empty."""
    frame = SAMPLE_RATE // 100
    num_frames = len(audio) // frame
    rms = np.sqrt(np.mean(audio[: num_frames * frame].reshape(-1, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms >= SILENCE_RMS)
    if loud.size == 0:
        return audio[:0]
    keep = int(KEEP_SILENCE * SAMPLE_RATE)
    start, end = loud[0] * frame, (loud[-1] + 1) * frame
    pad_before, pad_after = max(0, keep - start), max(0, end + keep - len(audio))
    kept = audio[max(0, start - keep) : end + keep]
    return np.pad(kept, (pad_before, pad_after)).clip(-1.0, 1.0)  # no int16 wrap-around


@dataclass(frozen=True)
class SpeechJob:
    """One utterance to synthesise into ``out``."""

    text: str
    voice: str
    speed: int
    pitch: int
    out: Path


def synthesize_all(jobs: list[SpeechJob], nj: int = 2, desc: str = "espeak-ng") -> None:
    """Synthesise every job, ``nj`` at a time, with a progress bar."""
    check_tools()

    def work(job: SpeechJob) -> None:
        speak(job.text, job.voice, job.speed, job.pitch, job.out)

    with ThreadPoolExecutor(max(1, nj)) as pool:
        for _ in tqdm(pool.map(work, jobs), total=len(jobs), desc=desc, mininterval=5):
            pass


def _settings_hash(seed: int) -> str:
    """What the audio of an utterance depends on, besides its index."""
    blob = json.dumps(
        {
            "seed": seed,
            "accents": ACCENTS,
            "variants": VARIANTS,
            "trim": [SILENCE_RMS, KEEP_SILENCE],
            "v": 3,
        }
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def synthesize_subset(root: Path, subset: str, size: int, seed: int, nj: int = 2) -> None:
    """Write ``size`` utterances of ``subset`` under ``root``; skip a subset already complete.

    Audio files are written atomically, so a rerun after an interruption redoes only what is
    missing. Each utterance depends only on (seed, subset, index): another size keeps the
    utterances that still fit and removes the rest; other settings (seed, voices) start over.
    """
    check_tools()
    subset_dir = root / subset
    marker = subset_dir / ".complete"
    settings = _settings_hash(seed)
    if marker.is_file():
        recorded = marker.read_text().split()
        if recorded == [settings, str(size)]:
            logging.info(f"{subset_dir}: complete, {size} utterances (seed {seed}); nothing to do")
            return
        if recorded[:1] != [settings]:
            logging.info(f"{subset_dir}: made with other settings; synthesising it again")
            shutil.rmtree(subset_dir)
        else:
            marker.unlink()
    plans = [plan_utterance(seed, subset, i) for i in range(size)]
    wanted = {u.audio_path(root) for u in plans}
    if subset_dir.is_dir():
        for stale in [*subset_dir.glob("*/*/*.flac"), *subset_dir.glob("*/*/*.trans.txt")]:
            if stale not in wanted:
                stale.unlink()
    todo = [u for u in plans if not u.audio_path(root).is_file()]
    logging.info(f"{subset_dir}: synthesising {len(todo)} of {size} utterances with {nj} jobs")

    synthesize_all(
        [SpeechJob(u.text, u.voice, u.speed, u.pitch, u.audio_path(root)) for u in todo],
        nj,
        desc=f"espeak-ng {subset}",
    )

    chapters: dict[Path, list[Utterance]] = defaultdict(list)
    for u in plans:
        chapters[u.audio_path(root).parent].append(u)
    for chapter_dir, utts in chapters.items():
        lines = "".join(f"{u.utt_id} {u.text}\n" for u in sorted(utts, key=lambda u: u.utt_id))
        atomic_write_text(chapter_dir / f"{utts[0].speaker}-{utts[0].chapter}.trans.txt", lines)
    for empty in sorted(subset_dir.glob("*/*"), reverse=True) + sorted(subset_dir.glob("*")):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    atomic_write_text(marker, f"{settings} {size}\n")


def synthesize_corpus(root: Path, sizes: dict[str, int], seed: int, nj: int) -> None:
    """Synthesise each subset (LibriSpeech name -> number of utterances) under ``root``."""
    for subset, size in sizes.items():
        synthesize_subset(root, subset, size, seed, nj)
