"""Stage 2: sentencepiece units (BPE, or characters for Mandarin and character models).

Token ids: 0 is ``<blk>`` (the CTC blank, sentencepiece's pad piece, never produced by
encoding), 1 is ``<unk>``, and one extra id after sentencepiece's pieces is ``<sos/eos>`` for
the attention decoder. ``tokens.txt`` lists ``piece id`` for every id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from comflp.expdir import TOKENIZER, TOKENS
from comflp.utils import atomic_path, atomic_write_text

SOS_EOS = "<sos/eos>"


class Tokenizer:
    """Text <-> token ids, with the blank and <sos/eos> conventions above."""

    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: tokenizer model not found (run stage 2)")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size() + 1
        self.sos_eos = self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if 0 < i < self.sos_eos])

    def tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())] + [SOS_EOS]


def train_tokenizer(texts: list[str], out_dir: Path, token_type: str, vocab_size: int) -> Tokenizer:
    """Train on ``texts`` and write ``tokenizer.model`` and ``tokens.txt`` into ``out_dir``.

    ``token_type`` is ``bpe`` (``vocab_size`` pieces) or ``char`` (every character seen,
    ``vocab_size`` ignored).
    """
    if token_type not in ("bpe", "char"):
        raise ValueError(f"token_type must be 'bpe' or 'char', got {token_type!r}")
    if not texts:
        raise ValueError("no training text for the tokenizer")
    if token_type == "bpe" and vocab_size < 3:
        raise ValueError(f"BPE vocabulary size must be >= 3, got {vocab_size}")
    if token_type == "char":
        vocab_size = len(set("".join(texts))) + 3  # generous; hard_vocab_limit=False trims it
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / TOKENIZER) as tmp, tmp.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=f,
            vocab_size=vocab_size,
            model_type=token_type,
            character_coverage=1.0,
            pad_id=0,
            pad_piece="<blk>",
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            hard_vocab_limit=False,
            add_dummy_prefix=token_type == "bpe",
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    tokenizer = Tokenizer(out_dir / TOKENIZER)
    atomic_write_text(
        out_dir / TOKENS,
        "".join(f"{piece} {i}\n" for i, piece in enumerate(tokenizer.tokens())),
    )
    return tokenizer
