#!/usr/bin/env python3
"""ESPnet's own decoding of the pruned models of an ESPnet experiment (stages 7-8 done).

For the main rows of the table (unpruned, the fine searches, GLP, the oracle, drop-top,
every-other, the fine-tuned models), decodes --set with ESPnet's ``Speech2Text`` joint
CTC/attention beam search (``bin/decode.py --decoding_method espnet_beam_search``, --num_parts
processes at once), each distinct model once, and scores CER/WER with comflp's scoring.
Writes ``<exp_dir>/speech2text_<set>_beam<B>/results.json``. Run with .venv-espnet's python::

    python local/speech2text_rows.py --exp_dir exp/encoder --set test-clean --beam_size 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from comflp.asr.scoring import error_stats
from comflp.expdir import METHOD_LISTS

ROOT = Path(__file__).resolve().parents[3]  # the repository
MAIN_ROWS = ("unpruned", "drop_top", "every_other", "glp", "oracle")


def main_rows(exp_dir: Path) -> list[dict]:
    """The methods of stage 7 (and 8) that the table's ESPnet column decodes."""
    rows = []
    for name in (METHOD_LISTS["compare"], METHOD_LISTS["finetune"]):
        path = exp_dir / "compare" / name
        if path.is_file():
            rows += json.loads(path.read_text())
    return [
        m
        for m in rows
        if m["name"] in MAIN_ROWS
        or m["name"] == "comflp"
        or m["name"].endswith(("_fine", "+finetune"))
    ]


def decode(method: dict, args: argparse.Namespace, out: Path) -> dict:
    """Decode one model in --num_parts processes; its CER, WER and wall time."""
    start = time.time()
    command = [
        sys.executable, str(ROOT / "bin/decode.py"), "--model_type", "espnet",
        "--model_dir", method["model_dir"], "--prune_layers", " ".join(map(str, method["pruned"])),
        "--output_dir", str(out), "--cuts", f"data/fbank/cuts_{args.set}.jsonl.gz",
        "--decoding_method", "espnet_beam_search", "--decode_beam_size", str(args.beam_size),
        "--ctc_weight", str(args.ctc_weight), "--num_parts", str(args.num_parts), "--device", "cpu",
    ]  # fmt: skip
    procs = [subprocess.Popen([*command, "--part", str(j)]) for j in range(1, args.num_parts + 1)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"decoding {method['name']} failed")
    utts = [u for f in sorted(out.rglob("part*.json")) for u in json.loads(f.read_text())["utts"]]
    refs, hyps = [u["ref"] for u in utts], [u["hyp"] for u in utts]
    return {
        "num_utts": len(utts),
        "cer": error_stats(refs, hyps, "char").err,
        "wer": error_stats(refs, hyps, "word").err,
        "seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--set", default="test-clean")
    parser.add_argument("--beam_size", type=int, default=5)
    parser.add_argument("--ctc_weight", type=float, default=0.3)
    parser.add_argument("--num_parts", type=int, default=2)
    args = parser.parse_args()
    out_root = args.exp_dir / f"speech2text_{args.set}_beam{args.beam_size}"
    done: dict[tuple, dict] = {}
    rows = []
    for m in main_rows(args.exp_dir):
        key = (m["model_dir"], tuple(m["pruned"]))
        if key not in done:
            name = f"{Path(m['model_dir']).name}__{'-'.join(map(str, m['pruned'])) or 'none'}"
            done[key] = decode(m, args, out_root / name)
            print(m["name"], done[key], flush=True)
        layers = m.get("original_pruned") or m["pruned"]
        rows.append(
            {"method": m["name"], "num_prune": m["num_prune"], "pruned": layers, **done[key]}
        )
    settings = {"set": args.set, "beam_size": args.beam_size, "ctc_weight": args.ctc_weight}
    (out_root / "results.json").write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
