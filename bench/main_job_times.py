#!/usr/bin/env python3
"""The main job's wall time stage by stage, read from run.sh's own log lines
(``<date> <time> (run.sh:N) Stage K: ...`` and ``Finished stages``) in the saved output of a
timed run, for docs/results/builtin/ (the README's budget: 30 minutes on 2 cores).

    ./run.sh 2>&1 | tee run.log
    python bench/main_job_times.py --log run.log --output main_job.md
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime
from pathlib import Path

from common import emit

from comflp.cli import UsageError, add_common_args, run
from comflp.report.provenance import written, written_lines

LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \(run\.sh:\d+\) (?:Stage (\d+): (.*)|(Finished) stages)"
)


def stage_spans(lines: list[str]) -> tuple[list[tuple[int, str, float]], float]:
    """(stage, its log lines' texts joined, seconds until the next stage began) for each stage,
    and the seconds from the first stage to ``Finished stages``."""
    starts: dict[int, tuple[datetime, list[str]]] = {}
    end = None
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
        if m.group(4):
            end = when
        else:
            starts.setdefault(int(m.group(2)), (when, []))[1].append(m.group(3))
    if not starts or end is None:
        raise UsageError("--log: expected run.sh's 'Stage K:' lines and its 'Finished stages' line")
    order = sorted(starts)
    times = [starts[k][0] for k in order] + [end]
    spans = [
        (k, "; ".join(starts[k][1]), (times[i + 1] - times[i]).total_seconds())
        for i, k in enumerate(order)
    ]
    return spans, (end - times[0]).total_seconds()


def min_s(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def main(args: argparse.Namespace) -> None:
    if not args.log.is_file():
        raise UsageError(f"--log {args.log}: not found")
    spans, total = stage_spans(args.log.read_text(errors="replace").splitlines())
    lines = [
        "# The main job's wall time, stage by stage",
        *written_lines(written()),
        f"- log: `{args.log}` (run.sh's output; each stage lasts until the next one's first line)",
        "",
        "| part | what | wall time (min:s) |",
        "| --- | --- | ---: |",
        *(f"| stage {k} | {what.replace('|', '/')} | {min_s(s)} |" for k, what, s in spans),
        f"| run.sh (all) | stages {spans[0][0]}-{spans[-1][0]} | {min_s(total)} |",
    ]
    emit("\n".join(lines) + "\n", args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="the saved output of ./run.sh")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())
