"""Stages 0-2: corpus manifests, fbank features with CMVN statistics, the tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lhotse import CutSet

from comflp.asr.data import cut_text, load_cuts, part_of
from comflp.asr.features import (
    SPEED_FACTORS,
    add_speed_perturbation,
    compute_cmvn,
    compute_fbank,
    save_cmvn,
)
from comflp.asr.tokenizer import train_tokenizer
from comflp.corpus.prepare import (
    DEFAULT_DOWNLOAD_URL,
    download_corpus,
    prepare_aishell_cuts,
    prepare_kaldi_cuts,
    prepare_librispeech_cuts,
    write_cuts,
)
from comflp.errors import InputError
from comflp.settings import REQUIRED, option
from comflp.utils import atomic_path

LAYOUTS = {
    "librispeech": prepare_librispeech_cuts,
    "aishell": prepare_aishell_cuts,
    "kaldi": prepare_kaldi_cuts,
}


@dataclass(kw_only=True)
class PrepareSettings:
    """Stage 0: a corpus on disk -> data/manifests/cuts_<subset>.jsonl.gz."""

    layout: str = option("librispeech", "the corpus's on-disk layout", choices=tuple(LAYOUTS))
    corpus_dir: Path = option(
        REQUIRED,
        "LibriSpeech: the directory holding the subsets; AISHELL-1: the one holding "
        "data_aishell/; kaldi: the one holding one data directory per subset",
    )
    subsets: list[str] = option(REQUIRED, "subset names")
    output_dir: Path = option(Path("data/manifests"), "where the manifests go")
    download: bool = option(False, "download the corpus first (lhotse)")
    download_url: str = option(DEFAULT_DOWNLOAD_URL, "OpenSLR resources URL or a mirror")
    nj: int = option(2, "parallel jobs")


def prepare(s: PrepareSettings) -> None:
    if s.download:
        download_corpus(s.layout, s.corpus_dir, s.subsets, s.download_url.rstrip("/"))
    write_cuts(LAYOUTS[s.layout](s.corpus_dir, s.subsets, s.nj), s.output_dir)


@dataclass(kw_only=True)
class FbankSettings:
    """Stage 1: 80-dim fbank (lhotse, lilcom storage) in parts, then merged with CMVN."""

    manifest_dir: Path = option(Path("data/manifests"), "stage 0's manifests")
    output_dir: Path = option(Path("data/fbank"), "features, cut sets and cmvn.json")
    subsets: list[str] = option(REQUIRED, "subset names")
    train_set: str = option(REQUIRED, "the subset speed perturbation and CMVN apply to")
    part: int = option(1, "which part (1-based) to compute")
    num_parts: int = option(1, "parts of the job array")
    max_utt_duration: float = option(20.0, "drop longer utterances (s)")
    speed_perturb: bool = option(False, "add 0.9x and 1.1x speed copies of the training set")

    def check(self) -> None:
        if self.train_set not in self.subsets:
            raise InputError(
                f"--train_set {self.train_set} must be one of --subsets {self.subsets}"
            )
        if not 1 <= self.part <= self.num_parts:
            raise InputError(
                f"--part {self.part} must be between 1 and --num_parts {self.num_parts}"
            )


def fbank_part(s: FbankSettings) -> None:
    """One part of each subset's features; the training set with speed copies if asked."""
    s.check()
    for subset in s.subsets:
        cuts = load_cuts(s.manifest_dir / f"cuts_{subset}.jsonl.gz")
        if subset == s.train_set and s.speed_perturb:
            cuts = add_speed_perturbation(cuts)
            factors = ", ".join(map(str, SPEED_FACTORS))
            logging.info(f"{subset}: {len(cuts)} utterances with speed copies ({factors})")
        part = part_of(cuts, s.part, s.num_parts)
        compute_fbank(part, s.output_dir / "parts", f"{subset}.{s.part}", 1, s.max_utt_duration)


def merge_fbank(s: FbankSettings) -> None:
    """Each subset's parts as data/fbank/cuts_<subset>.jsonl.gz, and the training set's global
    CMVN statistics."""
    s.check()
    merged = {}
    for subset in s.subsets:
        parts = []
        for part in range(1, s.num_parts + 1):
            path = s.output_dir / "parts" / f"cuts_{subset}.{part}.jsonl.gz"
            if not path.is_file():
                raise InputError(
                    f"{path}: missing (run bin/compute_fbank.py for parts 1..{s.num_parts})"
                )
            parts.append(load_cuts(path))
        merged[subset] = CutSet.from_cuts(sorted((c for p in parts for c in p), key=lambda c: c.id))
    for subset, cuts in merged.items():
        with atomic_path(s.output_dir / f"cuts_{subset}.jsonl.gz") as tmp:
            cuts.to_file(tmp)
        logging.info(
            f"{s.output_dir}/cuts_{subset}.jsonl.gz: {len(cuts)} utterances from {s.num_parts} part(s)"
        )
    stats = compute_cmvn(merged[s.train_set])
    save_cmvn(stats, s.output_dir / "cmvn.json")
    logging.info(
        f"{s.output_dir}/cmvn.json: global CMVN over {stats['frames']} frames of {s.train_set}"
    )


@dataclass(kw_only=True)
class TokenizerSettings:
    """Stage 2: a sentencepiece tokenizer on the training transcripts."""

    cuts: Path = option(REQUIRED, "training cuts with transcripts")
    output_dir: Path = option(REQUIRED, "the tokenizer's directory (data/lang_*)")
    token_type: str = option("char", "units", choices=("bpe", "char"))
    nbpe: int = option(256, "BPE vocabulary size (char: unused)")


def tokenizer(s: TokenizerSettings) -> None:
    texts = [cut_text(c) for c in load_cuts(s.cuts)]
    trained = train_tokenizer(texts, s.output_dir, s.token_type, s.nbpe)
    logging.info(
        f"{s.output_dir}: {s.token_type} tokenizer, {trained.vocab_size} tokens "
        "(with <blk> and <sos/eos>)"
    )
