#!/usr/bin/env python3
"""Train an ESPnet2 model on the built-in corpus with ESPnet's own tools, for --model_type espnet.

Run with .venv-espnet's python (utils/setup.sh --espnet), from a recipe directory whose
``data/fbank/cuts_<set>.jsonl.gz`` (stages 0-1) name the audio, e.g.::

    .venv-espnet/bin/python local/train.py --recipe_dir . --out_dir exp/espnet_asr   # in egs/espnet

Steps, as ESPnet's egs2 ``asr.sh`` does them (each skipped when its output exists):

1. export the cuts as Kaldi-style data directories (``wav.scp`` with absolute paths, ``text``,
   ``utt2spk``) under ``<out_dir>/data/<set>``;
2. the character token list with ``espnet2.bin.tokenize_text`` (``<blank>``, ``<unk>``,
   characters by frequency, ``<sos/eos>``);
3. ``espnet2.bin.asr_train --collect_stats true``: feature statistics (global MVN) and shapes;
4. ``espnet2.bin.asr_train`` with ``--config`` (the recipe's conf/train_transformer12.yaml), stopped
   at --minutes of wall time if it has not finished (the config's epochs are 200 steps, so the
   stop loses little; the last finished epoch is kept);
5. the model packed for comflp into ``<out_dir>/model``: ``config.yaml``, ``model.pth``
   (ESPnet's average of the best epochs if training finished, else the last epoch) and the
   files the config names,
   through comflp's ESPnet adapter (``EspnetModel.load(...).save(...)``).

Writes ``<out_dir>/train_info.json``: the commands, their wall times and the epochs finished.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SETS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
RECIPE = Path(__file__).resolve().parents[1]


def export_kaldi(recipe_dir: Path, cuts_file: Path, out: Path) -> int:
    """One Kaldi data directory from a cut manifest; the number of utterances."""
    rows = []
    with gzip.open(cuts_file, "rt") as f:
        for line in f:
            cut = json.loads(line)
            (source,) = cut["recording"]["sources"]
            if cut["start"] != 0 or cut["duration"] != cut["recording"]["duration"]:
                raise SystemExit(f"{cuts_file}: cut {cut['id']} is not a whole recording")
            text = " ".join(s["text"] for s in cut["supervisions"] if s.get("text"))
            speaker = cut["supervisions"][0].get("speaker") or cut["id"]
            rows.append((cut["id"], str((recipe_dir / source["source"]).resolve()), text, speaker))
    rows.sort()
    out.mkdir(parents=True, exist_ok=True)
    (out / "wav.scp").write_text("".join(f"{u} {p}\n" for u, p, _, _ in rows))
    (out / "text").write_text("".join(f"{u} {t}\n" for u, _, t, _ in rows))
    (out / "utt2spk").write_text("".join(f"{u} {s}-{u}\n" for u, _, _, s in rows))
    return len(rows)


def run_step(
    name: str, cmd: list[str], log: Path, info: dict, timeout: float | None = None
) -> bool:
    """Run one step, logging to ``log``; False when stopped at ``timeout`` seconds."""
    logging.info(f"{name}: {' '.join(cmd)} (log {log})")
    start = time.time()
    finished = True
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logging.warning(f"{name}: stopped after {timeout / 60:.0f} minutes")
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            finished = False
    info["steps"][name] = {"command": cmd, "seconds": round(time.time() - start, 1)}
    if finished and proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    return finished


def data_args(out_dir: Path) -> list[str]:
    """ESPnet's data options for the train and dev sets."""
    args = []
    for split, name in (("train", "train"), ("valid", "dev")):
        d = out_dir / "data" / name
        args += [
            f"--{split}_data_path_and_name_and_type",
            f"{d}/wav.scp,speech,sound",
            f"--{split}_data_path_and_name_and_type",
            f"{d}/text,text,text",
        ]
    return args


def common_args(out_dir: Path, config: Path) -> list[str]:
    return [
        "--use_preprocessor",
        "true",
        "--token_type",
        "char",
        "--token_list",
        str(out_dir / "tokens.txt"),
        "--non_linguistic_symbols",
        "none",
        "--cleaner",
        "none",
        "--g2p",
        "none",
        "--config",
        str(config),
        "--frontend_conf",
        "fs=16k",
        "--ngpu",
        "0",
        *data_args(out_dir),
    ]


def prepare(args: argparse.Namespace, info: dict) -> None:
    """Steps 1-3: data directories, token list, statistics."""
    out = args.out_dir
    for name, subset in SETS.items():
        if not (out / "data" / name / "text").is_file():
            cuts = args.recipe_dir / f"data/fbank/cuts_{subset}.jsonl.gz"
            info["utterances"][name] = export_kaldi(args.recipe_dir, cuts, out / "data" / name)
    if not (out / "tokens.txt").is_file():
        text_only = out / "data/train/text_only"
        text_only.write_text(
            "".join(line.split(" ", 1)[1] for line in (out / "data/train/text").open())
        )
        run_step(
            "token_list",
            [sys.executable, "-m", "espnet2.bin.tokenize_text", "--token_type", "char",
             "--input", str(text_only), "--output", str(out / "tokens.txt"), "--field", "1-",
             "--cleaner", "none", "--write_vocabulary", "true", "--add_symbol", "<blank>:0",
             "--add_symbol", "<unk>:1", "--add_symbol", "<sos/eos>:-1"],
            out / "log/token_list.log", info,
        )  # fmt: skip
    stats = out / "stats"
    if not (stats / "train/feats_stats.npz").is_file():
        run_step(
            "collect_stats",
            [sys.executable, "-m", "espnet2.bin.asr_train", "--collect_stats", "true",
             *common_args(out, args.config), "--normalize", "none",  # the statistics come from here
             "--train_shape_file", str(out / "data/train/wav.scp"),
             "--valid_shape_file", str(out / "data/dev/wav.scp"), "--output_dir", str(stats)],
            out / "log/collect_stats.log", info,
        )  # fmt: skip


def train(args: argparse.Namespace, info: dict) -> bool:
    """Step 4; True when ESPnet's trainer finished every epoch."""
    out, stats = args.out_dir, args.out_dir / "stats"
    return run_step(
        "asr_train",
        [sys.executable, "-m", "espnet2.bin.asr_train", *common_args(out, args.config),
         "--train_shape_file", str(stats / "train/speech_shape"),
         "--train_shape_file", str(stats / "train/text_shape"),
         "--valid_shape_file", str(stats / "valid/speech_shape"),
         "--valid_shape_file", str(stats / "valid/text_shape"),
         "--normalize_conf", f"stats_file={stats / 'train/feats_stats.npz'}",
         "--resume", "true", "--output_dir", str(out / "asr")],
        out / "log/asr_train.log", info, timeout=args.minutes * 60,
    )  # fmt: skip


def pack(args: argparse.Namespace, finished: bool, info: dict) -> None:
    """Step 5: the model directory comflp prunes."""
    from comflp.adapters.espnet import EspnetModel

    asr = args.out_dir / "asr"
    epochs = sorted(int(p.name[: -len("epoch.pth")]) for p in asr.glob("*epoch.pth"))
    if not epochs:
        raise SystemExit(f"{asr}: no epoch finished within {args.minutes} minutes")
    chosen = asr / "valid.acc.ave.pth" if finished else asr / f"{epochs[-1]}epoch.pth"
    staging = args.out_dir / "pack"
    staging.mkdir(exist_ok=True)
    for name in ("config.yaml", "model.pth"):
        (staging / name).unlink(missing_ok=True)
    (staging / "config.yaml").symlink_to(asr / "config.yaml")
    (staging / "model.pth").symlink_to(chosen.resolve())
    EspnetModel.load(staging).save(args.out_dir / "model", {"trained_from": str(chosen)})
    info.update(finished=finished, epochs=epochs, model=str(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe_dir", type=Path, default=Path("."))
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=RECIPE / "conf/train_transformer12.yaml")
    parser.add_argument("--minutes", type=float, default=40, help="wall-time limit of training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.recipe_dir, args.out_dir = args.recipe_dir.resolve(), args.out_dir.resolve()
    (args.out_dir / "log").mkdir(parents=True, exist_ok=True)
    info = {"config": str(args.config), "utterances": {}, "steps": {}, "minutes": args.minutes}
    prepare(args, info)
    finished = train(args, info)
    pack(args, finished, info)
    (args.out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logging.info(f"model for --model_type espnet: {args.out_dir / 'model'}")


if __name__ == "__main__":
    main()
