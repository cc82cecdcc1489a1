#!/usr/bin/env python3
"""Benchmark: peak memory and time of stage 4 (the layer dump) for a small and a large subset.

Runs bin/dump_layers.py (--pooling: frames, run.sh's default, or mean; one part, CPU) on the model of --exp_dir in a fresh
child process for each calibration size in --num_utts (default 320 and 3200), each dumping into
its own scratch experiment directory (--exp_dir is not written to), and reads that child's own
peak resident set size from os.wait4 (ru_maxrss), so one measurement cannot leak into the next.
All sizes draw from the same cut set, by default the training set and the dev set combined (the
built-in corpus's training set has 3000 utterances), written once to a scratch file, so every
child loads the same manifest. A child that only imports the modules gives the memory floor.
Reports the peak RSS, the wall time of the child (start-up and model loading included), the
dump's own compute time, and the ratio to the first size. Prints a Markdown table, also written
to --output.

    python bench/dump_memory.py --workdir . --exp_dir exp/baseline --output exp/bench/dump_memory.md
    python bench/dump_memory.py --workdir /tmp/tiny --exp_dir /tmp/tiny/exp/baseline --num_utts "8 40"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

from comflp.asr.data import load_cuts
from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import DUMP_INFO, ExpDir

DUMP_SCRIPT = Path(__file__).resolve().parents[1] / "bin" / "dump_layers.py"
IMPORTS_ONLY = "import comflp.adapters.native, comflp.asr.data, comflp.cli, comflp.prune.dump"


def measured_child(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` to its end; its peak RSS (MiB) and wall seconds. Fails naming ``log``."""
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise UsageError(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def combined_cuts(args: argparse.Namespace, scratch: Path) -> Path:
    """--cuts, or the training and dev sets written as one manifest."""
    if args.cuts:
        return args.cuts
    fbank = args.workdir / "data" / "fbank"
    sets = [load_cuts(fbank / f"cuts_{name}.jsonl.gz") for name in (args.train_set, args.dev_set)]
    path = scratch / "cuts.jsonl.gz"
    (sets[0] + sets[1]).to_file(path)
    return path


def dump_command(args: argparse.Namespace, cuts: Path, num_utts: int, exp_dir: Path) -> list[str]:
    """bin/dump_layers.py on the model of --exp_dir, its dump in the scratch ``exp_dir``."""
    command = [sys.executable, str(DUMP_SCRIPT), "--exp_dir", str(exp_dir)]
    command += ["--model_dir", str(args.exp_dir), "--cuts", str(cuts)]
    command += ["--calib_num_utts", str(num_utts), "--pooling", args.pooling, "--device", "cpu"]
    return command + (["--nthreads", str(args.nthreads)] if args.nthreads else [])


def measure(args: argparse.Namespace, sizes: list[int], scratch: Path) -> list[dict]:
    cuts = combined_cuts(args, scratch)
    rss, seconds = measured_child([sys.executable, "-c", IMPORTS_ONLY], scratch / "imports.log")
    rows = [{"name": "imports only (no dump)", "rss": rss, "seconds": seconds}]
    for n in sizes:
        exp_dir = scratch / f"dump{n}"
        rss, seconds = measured_child(
            dump_command(args, cuts, n, exp_dir), scratch / f"dump{n}.log"
        )
        info = json.loads((ExpDir(exp_dir).dump_part(1) / DUMP_INFO).read_text())
        rows.append(
            {
                "name": f"dump of {n} utterances",
                "utts": info["num_utts"],
                "rows": info["num_rows"],
                "rss": rss,
                "seconds": seconds,
                "dump_seconds": info["seconds"],
            }
        )
    return rows


def markdown(rows: list[dict], notes: list[str]) -> str:
    """One row per child; the dumps also relative to the imports-only floor and the first size."""
    lines = [
        *notes,
        "",
        "| run | N dumped | rows | peak RSS MiB | above imports MiB | wall s | dump s | RSS vs first dump |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    floor, first = rows[0]["rss"], rows[1]["rss"]
    lines.append(f"| {rows[0]['name']} | | | {floor:.0f} | | {rows[0]['seconds']:.1f} | | |")
    for r in rows[1:]:
        lines.append(
            f"| {r['name']} | {r['utts']} | {r['rows']} | {r['rss']:.0f} | {r['rss'] - floor:.0f} | "
            f"{r['seconds']:.1f} | {r['dump_seconds']:.1f} | {r['rss'] / first:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.num_utts.split()]
    if not sizes or min(sizes) < 2:
        raise UsageError(f"--num_utts {args.num_utts!r}: sizes of at least 2 utterances")
    with tempfile.TemporaryDirectory(prefix="dump_memory_") as tmp:
        rows = measure(args, sizes, Path(tmp))
    source = args.cuts or f"{args.train_set} + {args.dev_set} of {args.workdir}"
    notes = [
        f"Stage 4 (bin/dump_layers.py, {args.pooling} pooling, CPU) of {args.exp_dir} on random subsets "
        f"of {source}; one child process per row, its own peak RSS (os.wait4 ru_maxrss). "
        "Wall: the whole child (start-up, manifest and model loading, dump); dump: the dump "
        "itself (info.json).",
    ]
    emit(markdown(rows, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp_dir", type=Path, required=True, help="experiment directory")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where stages 0-2 ran")
    parser.add_argument("--train_set", default="train-clean-100")
    parser.add_argument("--dev_set", default="dev-clean")
    parser.add_argument("--cuts", type=Path, help="draw from these cuts instead of train + dev")
    parser.add_argument("--num_utts", default="320 3200", help="calibration sizes to measure")
    parser.add_argument("--pooling", default="frames", choices=("frames", "mean"))
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)
