#!/usr/bin/env python3
"""Train a small Whisper-architecture model (``WhisperForConditionalGeneration``) from scratch
on the built-in corpus (CPU, a wall-time budget): stage 3 of ``egs/whisper_scratch``, an
encoder-decoder model trained elsewhere whose encoder and decoder stages 4-8 prune
(``--model_type hf --decoding_method attention_greedy_search``).

Reads the lhotse manifests of stage 0 (``--manifest_dir``, raw 16 kHz audio). The processor
(:func:`comflp.adapters.whisper.char_processor`) has a character vocabulary of the training
transcripts and a ``--chunk_length``-second input window (80 log-mel bins, a
``--hop_length``-sample hop: 20 ms by default, so the encoder's frames are 40 ms apart);
``max_source_positions`` follows from both. Utterances longer than the window are left out of
training. Whisper pads every input to the whole window, so training packs up to
``--max_pack`` random utterances into one example that fits it (lhotse's ``append``; their
transcripts joined by a space), as Whisper's own training segments hold several sentences;
dev utterances are decoded one by one, as the pipeline decodes them.

Loss: the decoder's teacher-forced cross entropy (comflp's :meth:`WhisperAdapter.training_loss`
on the prompt ``<|startoftranscript|><|notimestamps|>``), plus ``--ctc_weight`` times a CTC loss
of a linear head on the encoder output that exists only during training (it speeds up
learning the alignment; the saved model is a plain Whisper). AdamW, linear warm-up, then a
cosine decay over the wall time left. Dev CER by greedy decoding (comflp's, equal to
``generate``'s) after every ``--eval_every`` steps and when the budget ends; the best model is
written with ``save_pretrained`` plus its processor into ``--out_dir``, the evaluations to
``history.json`` there.

    python local/train.py --workdir . --out_dir exp/whisper --minutes 42
    python local/train.py --workdir $tiny --out_dir /tmp/w --minutes 1 \\
        --d_model 32 --encoder_layers 2 --decoder_layers 2 --dev_num_utts 8   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import random

import torch
from lhotse import CutSet

from comflp.adapters.whisper import WhisperAdapter, char_model, char_processor
from comflp.asr.data import cut_text, eval_loader, load_cuts, random_subset
from comflp.cli import add_common_args, positive_int, run
from comflp.train.budget import Evaluator, budget_parser, train_for_budget
from comflp.utils import seed_everything


def packed_batches(cuts: CutSet, args: argparse.Namespace, rng: random.Random):
    """One epoch of batches of packed examples: the cuts shuffled, each example up to
    ``max_pack`` of them (a random count) within the window, ``batch_size`` per batch."""
    order = list(cuts)
    rng.shuffle(order)
    examples, i = [], 0
    while i < len(order):
        pack, want = order[i], rng.randint(1, args.max_pack)
        i += 1
        while (
            want > 1 and i < len(order) and pack.duration + order[i].duration <= args.chunk_length
        ):
            pack, want, i = pack.append(order[i]), want - 1, i + 1
        examples.append(pack)
    for start in range(0, len(examples), args.batch_size):
        yield CutSet.from_cuts(examples[start : start + args.batch_size])


def build(args: argparse.Namespace, texts: list[str]) -> tuple[WhisperAdapter, torch.nn.Linear]:
    """The model, its processor (saved in ``--out_dir``) and the training-only CTC head."""
    processor = char_processor(
        sorted({c for t in texts for c in t}), args.out_dir, args.chunk_length, args.hop_length
    )
    hf = char_model(
        processor,
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model,
        max_target_positions=args.max_target_positions,
        dropout=args.dropout,
    )
    ctc_head = torch.nn.Linear(args.d_model, len(processor.tokenizer) + 1)  # blank: the last
    return WhisperAdapter(hf, processor, args.out_dir), ctc_head


def joint_loss(model: WhisperAdapter, ctc_head, batch: dict, ctc_weight: float):
    """(loss, attention loss, CTC loss) per utterance of a batch."""
    memory = model.encode(batch)
    b = len(batch["ids"])
    att = model.teacher_forced_nll(memory, batch) / b
    if ctc_weight == 0:
        return att, att.item(), 0.0
    log_probs = ctc_head(memory.x).log_softmax(-1).transpose(0, 1)
    ctc = torch.nn.functional.ctc_loss(
        log_probs,
        batch["targets"],
        memory.lengths,
        batch["target_lens"],
        blank=ctc_head.out_features - 1,
        reduction="sum",
        zero_infinity=True,
    )
    ctc = ctc / b
    return (1 - ctc_weight) * att + ctc_weight * ctc, att.item(), ctc.item()


def main(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    rng = random.Random(args.seed)
    manifests = args.workdir / args.manifest_dir
    train_cuts = load_cuts(manifests / f"cuts_{args.train_set}.jsonl.gz")
    train_cuts = train_cuts.filter(lambda c: c.duration <= args.chunk_length).to_eager()
    dev_cuts = random_subset(
        load_cuts(manifests / f"cuts_{args.dev_set}.jsonl.gz"), args.dev_num_utts, args.seed
    )
    model, ctc_head = build(args, [cut_text(c).upper() for c in train_cuts])
    logging.info(
        f"Whisper: {model.num_layers} encoder + {model.num_decoder_layers} decoder layers, "
        f"d_model {args.d_model}, {model.num_parameters() / 1e6:.2f} M parameters, vocabulary "
        f"{len(model.processor.tokenizer)}, window {args.chunk_length} s "
        f"({model.hf.config.max_source_positions} encoder frames); {len(train_cuts)} training "
        f"utterances, {len(dev_cuts)} dev"
    )
    params = list(model.module.parameters()) + list(ctc_head.parameters())
    dev_batches = list(eval_loader(dev_cuts, model.dataset(), args.eval_max_duration))
    evaluate = Evaluator(model, dev_batches, args, "NLL/utt")
    dataset = model.dataset()

    def loss_of(batch: dict) -> tuple[torch.Tensor, str]:
        loss, att, ctc = joint_loss(model, ctc_head, batch, args.ctc_weight)
        return loss, f"attention {att:.2f}, CTC {ctc:.2f} per utterance"

    def epoch_batches(epoch: int):
        return (dataset[cuts] for cuts in packed_batches(train_cuts, args, rng))

    train_for_budget(args, evaluate, params, epoch_batches, loss_of)


def build_parser() -> argparse.ArgumentParser:
    parser, train = budget_parser(__doc__, lr=1.5e-3, minutes=42.0)
    model = parser.add_argument_group("model")
    model.add_argument("--d_model", type=positive_int, default=144)
    model.add_argument("--heads", type=positive_int, default=4)
    model.add_argument("--encoder_layers", type=positive_int, default=8)
    model.add_argument("--decoder_layers", type=positive_int, default=8)
    model.add_argument("--max_target_positions", type=positive_int, default=192)
    model.add_argument("--chunk_length", type=positive_int, default=8, help="input window (s)")
    model.add_argument("--hop_length", type=positive_int, default=320, help="mel hop (samples)")
    model.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--batch_size", type=positive_int, default=12, help="packed examples")
    train.add_argument("--max_pack", type=positive_int, default=3, help="utterances per example")
    train.add_argument("--ctc_weight", type=float, default=0.3)
    train.add_argument("--eval_max_duration", type=float, default=60.0)
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())
