#!/usr/bin/env python3
"""Train a small Hugging Face ``Wav2Vec2ForCTC`` (or HuBERT's or WavLM's, ``--architecture``)
from scratch on the built-in corpus (CPU, a wall-time budget): stage 3 of ``egs/wav2vec2``,
a model trained elsewhere that really recognises speech, which stages 4-8 prune with
``--model_type hf``.

Reads the lhotse manifests of stage 0 (``--manifest_dir``, raw 16 kHz audio; no fbank needed)
and builds a character vocabulary from the training transcripts (``|`` between words, ``<pad>``
the CTC blank). The model is CoMFLP's class, ``Wav2Vec2ForCTC`` (12 layers, hidden size 144,
4 heads by default), trained with CTC through comflp's HF adapter (its SpecAugment, dropout,
and the optional LayerNorm before ``lm_head`` of CoMFLP's AISHELL model, ``--lm_head_norm``),
AdamW, linear warm-up over ``--warmup_steps`` and then a cosine decay over the remaining wall
time. Dev CER (greedy CTC, :func:`evaluate_subsets` through the adapter) after every epoch,
every ``--eval_every`` steps and when the budget ends; the best model is written with
``save_pretrained`` plus its processor into ``--out_dir``, the evaluations to
``history.json`` there.

    python local/train.py --workdir . --out_dir exp/wav2vec2 --minutes 30
    python local/train.py --workdir $tiny --out_dir /tmp/hf --minutes 1 \\
        --num_layers 2 --hidden_size 32 --dev_num_utts 8        # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from comflp.adapters.hf import HFModel
from comflp.asr.ctc import ctc_loss
from comflp.asr.data import cut_text, load_cuts, load_eval_batches, random_subset, train_sampler
from comflp.cli import UsageError, add_common_args, positive_int, run
from comflp.train.budget import Evaluator, budget_parser, train_for_budget
from comflp.utils import seed_everything

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "|"]
# --architecture: the transformers config and CTC model classes. HuBERT and WavLM share
# wav2vec2's layout (conv front end, positional convolution, Transformer layers) and differ in
# pre-training, which a model trained from scratch on CTC does not have; WavLM's layers add
# gated relative position bias.
ARCHITECTURES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC"),
    "hubert": ("HubertConfig", "HubertForCTC"),
    "wavlm": ("WavLMConfig", "WavLMForCTC"),
}


def build_processor(texts: list[str], out_dir: Path):
    """A Wav2Vec2Processor with a character vocabulary of ``texts`` (saved in ``out_dir``)."""
    import transformers

    chars = sorted({c for t in texts for c in t} - {" "})
    vocab = {token: i for i, token in enumerate(SPECIAL + chars)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(
        str(out_dir / "vocab.json"), unk_token="<unk>", pad_token="<pad>"
    )
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True
    )
    return transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def build_model(args: argparse.Namespace, processor) -> HFModel:
    import transformers

    conv_dim = [int(x) for x in args.conv_dim.split()]
    conv_kernel = [int(x) for x in args.conv_kernel.split()]
    conv_stride = [int(x) for x in args.conv_stride.split()]
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
        raise UsageError(
            "--conv_dim, --conv_kernel and --conv_stride need the same number of values"
        )
    config_class, model_class = ARCHITECTURES[args.architecture]
    config = getattr(transformers, config_class)(
        vocab_size=len(processor.tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        conv_dim=conv_dim,
        conv_kernel=conv_kernel,
        conv_stride=conv_stride,
        feat_extract_norm="layer",
        do_stable_layer_norm=args.stable_layer_norm,
        num_conv_pos_embeddings=args.pos_conv_kernel,
        num_conv_pos_embedding_groups=args.pos_conv_groups,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        activation_dropout=args.dropout,
        feat_proj_dropout=args.dropout,
        final_dropout=args.dropout,
        layerdrop=0.0,
        mask_time_prob=args.mask_time_prob,
        mask_time_length=5,
        pad_token_id=processor.tokenizer.pad_token_id,
        ctc_loss_reduction="sum",
        architectures=[model_class],
    )
    hf = getattr(transformers, model_class)(config)
    norm = None
    if args.lm_head_norm:
        hf.add_module("lm_head_norm", torch.nn.LayerNorm(args.hidden_size, config.layer_norm_eps))
        norm = "lm_head_norm"
    return HFModel(hf, processor, args.out_dir, norm)


def main(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    manifests = args.workdir / args.manifest_dir
    train_cuts = load_cuts(manifests / f"cuts_{args.train_set}.jsonl.gz")
    if args.num_train:
        train_cuts = random_subset(train_cuts, args.num_train, args.seed)
    dev_cuts = random_subset(
        load_cuts(manifests / f"cuts_{args.dev_set}.jsonl.gz"), args.dev_num_utts, args.seed
    )
    processor = build_processor([cut_text(c).upper() for c in train_cuts], args.out_dir)
    model = build_model(args, processor)
    logging.info(
        f"{ARCHITECTURES[args.architecture][1]}: {model.num_layers} layers, hidden {args.hidden_size}, "
        f"{model.num_parameters() / 1e6:.2f} M parameters, vocabulary {len(processor.tokenizer)}; "
        f"{len(train_cuts)} training utterances, {len(dev_cuts)} dev"
    )
    dev_batches = load_eval_batches(model, dev_cuts, args.max_duration)
    evaluate = Evaluator(model, dev_batches, args, "CTC loss")
    dataset = model.dataset()

    def loss_of(batch: dict) -> tuple[torch.Tensor, str]:
        log_probs, lengths = model.log_probs(batch)
        loss = ctc_loss(log_probs, lengths, batch["targets"], batch["target_lens"], model.blank_id)
        per_utt = loss / len(batch["ids"])
        return per_utt, f"loss/utt {per_utt.item():.3f}"

    def epoch_batches(epoch: int):
        sampler = train_sampler(train_cuts, args.max_duration, args.num_buckets, args.seed)
        sampler.set_epoch(epoch)
        return (dataset[cuts] for cuts in sampler)

    params = list(model.module.parameters())
    train_for_budget(args, evaluate, params, epoch_batches, loss_of, eval_each_epoch=True)


def build_parser() -> argparse.ArgumentParser:
    parser, train = budget_parser(__doc__, lr=1e-3, minutes=30.0)
    parser.add_argument("--num_train", type=int, default=0, help="random training subset (0: all)")
    model = parser.add_argument_group("model")
    model.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="wav2vec2")
    model.add_argument("--num_layers", type=positive_int, default=12)
    model.add_argument("--hidden_size", type=positive_int, default=144)
    model.add_argument("--num_heads", type=positive_int, default=4)
    model.add_argument("--intermediate_size", type=positive_int, default=576)
    model.add_argument("--conv_dim", default="64 128 128 128 128 144 144")
    model.add_argument("--conv_kernel", default="10 3 3 3 3 2 2")
    model.add_argument("--conv_stride", default="5 2 2 2 2 2 2", help="product 320: 20 ms frames")
    model.add_argument("--pos_conv_kernel", type=positive_int, default=64)
    model.add_argument("--pos_conv_groups", type=positive_int, default=8)
    model.add_argument(
        "--stable_layer_norm",
        type=lambda v: v.lower() in ("true", "1", "yes"),
        default=True,
        help="pre-norm layers (true) or post-norm layers, as wav2vec2-base (false)",
    )
    model.add_argument(
        "--lm_head_norm", action="store_true", help="a LayerNorm before lm_head (CoMFLP's model)"
    )
    model.add_argument("--dropout", type=float, default=0.1)
    model.add_argument("--mask_time_prob", type=float, default=0.05)
    train.add_argument(
        "--max_duration", type=float, default=60.0, help="seconds of audio per batch"
    )
    train.add_argument("--num_buckets", type=positive_int, default=10)
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())
