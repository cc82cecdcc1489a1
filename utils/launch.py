#!/usr/bin/env python3
"""Run a command as one task or an array of tasks, each logging to its own file (ESPnet's run.pl shape).

    launch.py [--backend local] [--gpu N] [--mem 8G] [--time 4:00:00] [--num_threads N]
              [--max_jobs_run N] [JOB=1:N] LOG command ...

``JOB`` in LOG and in the command is replaced by the task number. Each log starts with the
command and ends with its exit code and elapsed time. Exit status: 0 when every task
succeeded, else 1, naming the failed tasks' logs. A single task (no JOB range) also echoes
its output to the terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Task:
    index: int | None  # None: not part of an array
    log: Path
    command: str


def substitute(text: str, var: str, index: int | None) -> str:
    """Replace the task variable (a whole word) by the task number."""
    return text if index is None else re.sub(rf"\b{var}\b", str(index), text)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Task]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="local", choices=["local"])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--mem", default=None)
    parser.add_argument("--time", default=None)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--max_jobs_run", type=int, default=os.cpu_count() or 1)
    opts, rest = parser.parse_known_args(argv)
    if rest and rest[0].startswith("--"):
        parser.error(f"unknown option {rest[0]}")
    indices: list[int | None] = [None]
    var = "JOB"
    if rest and (m := re.fullmatch(r"([A-Za-z_]+)=(\d+):(\d+)", rest[0])):
        var, first, last = m.group(1), int(m.group(2)), int(m.group(3))
        if last < first:
            parser.error(f"empty task range {rest[0]}")
        indices = list(range(first, last + 1))
        rest = rest[1:]
    if len(rest) < 2:
        parser.error("expected LOG and a command")
    log, command = rest[0], rest[1:]
    if indices != [None] and var not in log:
        parser.error(f"the log name {log} must contain {var} for a task array")
    tasks = []
    for i in indices:
        words = [substitute(w, var, i) for w in command]
        script = words[0] if len(words) == 1 else shlex.join(words)
        tasks.append(Task(i, Path(substitute(log, var, i)), script))
    return opts, tasks


def run_local(task: Task, num_threads: int, echo: bool) -> int:
    """Run one task under bash, writing run.pl's header and footer around its output."""
    task.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads))
    start = time.time()
    with task.log.open("w") as log:
        log.write(f"# {task.command}\n# Started at {time.ctime(start)}\n#\n")
        log.flush()
        proc = subprocess.Popen(
            ["bash", "-c", task.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            text = chunk.decode(errors="replace")
            log.write(text)
            log.flush()
            if echo:
                sys.stderr.write(text)
                sys.stderr.flush()
        code = proc.wait()
        elapsed = time.time() - start
        log.write(f"# Accounting: time={elapsed:.0f} threads={num_threads}\n")
        log.write(f"# Ended (code {code}) at {time.ctime()}, elapsed time {elapsed:.0f} seconds\n")
    return code


def main(argv: list[str]) -> int:
    opts, tasks = parse_args(argv)
    echo = len(tasks) == 1 and tasks[0].index is None
    with ThreadPoolExecutor(max(1, min(opts.max_jobs_run, len(tasks)))) as pool:
        codes = list(pool.map(lambda t: run_local(t, opts.num_threads, echo), tasks))
    failed = [t for t, c in zip(tasks, codes) if c != 0]
    if failed:
        logs = ", ".join(str(t.log) for t in failed)
        print(
            f"launch.py: {len(failed)} of {len(tasks)} task(s) failed; see {logs}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
