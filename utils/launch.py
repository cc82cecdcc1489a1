#!/usr/bin/env python3
"""Run a command as one task or an array of tasks, each logging to its own file (ESPnet's run.pl / slurm.pl shape).

    launch.py [--backend local|slurm] [--gpu N] [--mem 8G] [--time 4:00:00] [--num_threads N]
              [--max_jobs_run N] [--config conf/slurm.conf] [--quiet] [JOB=1:N] LOG command ...

Options come first; from LOG (or the JOB range) on, everything is the command, untouched.
``JOB`` in LOG and in the command is replaced by the task number. Each log starts with the
command and ends with its exit code and elapsed time. Exit status: 0 when every task
succeeded, else 1, naming the failed tasks' logs (2: bad usage; 128+N: stopped by signal N).
A single task (no JOB range) also echoes its output to the terminal, unless --quiet.

Backends:
  local  the tasks run on this machine, at most --max_jobs_run at a time (default: one per
         core); --gpu, --mem and --time are ignored.
  slurm  one sbatch job (a job array for JOB=1:N, at most --max_jobs_run tasks at a time)
         running in the current directory with the current environment; --gpu, --mem, --time
         and --num_threads become sbatch options through --config (ESPnet's slurm.conf
         format; default: conf/slurm.conf of the current directory, else comflp's own). The
         launcher polls squeue until the job is done; SIGINT or SIGTERM cancels the job.
         The job script and Slurm's own output go to a q/ directory beside the logs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TOOLKIT_SLURM_CONF = Path(__file__).resolve().parents[1] / "conf" / "slurm.conf"
FLAGS = {"--quiet"}  # the options that take no value
GENERIC_OPTIONS = ("gpu", "mem", "time", "num_threads")  # mapped to sbatch through slurm.conf
RANGE = re.compile(r"([A-Za-z_]\w*)=(\d+):(\d+)")
ENDED = re.compile(r"^# Ended \(code (-?\d+)\)", re.MULTILINE)


class LaunchError(Exception):
    """A problem running the tasks (not in a task itself): one error line, exit status 1."""


@dataclass
class Task:
    index: int | None  # None: not part of an array
    log: Path
    command: str


@dataclass
class Request:
    """What to run: the LOG and command templates and the task range (none for one task)."""

    log: str
    words: list[str]
    var: str = "JOB"
    first: int | None = None
    last: int | None = None
    tasks: list[Task] = field(init=False)

    def __post_init__(self) -> None:
        indices = [None] if self.first is None else range(self.first, self.last + 1)
        self.tasks = []
        for i in indices:
            words = [substitute(w, self.var, i) for w in self.words]
            script = words[0] if len(words) == 1 else shlex.join(words)
            self.tasks.append(Task(i, Path(substitute(self.log, self.var, i)), script))

    @property
    def is_array(self) -> bool:
        return self.first is not None


def substitute(text: str, var: str, index: int | str | None) -> str:
    """Replace the task variable (a whole word) by the task number."""
    return text if index is None else re.sub(rf"\b{var}\b", str(index), text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--backend", default="local", choices=["local", "slurm"])
    parser.add_argument("--gpu", default=None, help="GPUs per task (slurm)")
    parser.add_argument("--mem", default=None, help="memory per task, e.g. 8G (slurm)")
    parser.add_argument("--time", default=None, help="time limit per task, e.g. 4:00:00 (slurm)")
    parser.add_argument("--num_threads", type=int, default=None, help="threads per task [1]")
    parser.add_argument("--max_jobs_run", type=int, default=None, help="tasks running at once")
    parser.add_argument("--config", default=None, help="slurm.conf mapping options to sbatch")
    parser.add_argument("--quiet", action="store_true", help="do not echo a single task's output")
    return parser


def split_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """The leading launcher options, and the rest (range, LOG, command), never read as options."""
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        i += 1 if "=" in argv[i] or argv[i] in FLAGS else 2
    return argv[:i], argv[i:]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Request]:
    parser = build_parser()
    head, rest = split_options(argv)
    opts = parser.parse_args(head)
    for name in ("num_threads", "max_jobs_run"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            parser.error(f"--{name} must be at least 1")
    var, first, last = "JOB", None, None
    if rest and (m := RANGE.fullmatch(rest[0])):
        var, first, last = m.group(1), int(m.group(2)), int(m.group(3))
        if last < first:
            parser.error(f"empty task range {rest[0]}")
        rest = rest[1:]
    elif rest and re.match(r"[A-Za-z_]\w*=", rest[0]):
        parser.error(f"bad task range {rest[0]} (expected VAR=FIRST:LAST, e.g. JOB=1:4)")
    if len(rest) < 2:
        parser.error("expected LOG and a command")
    log, words = rest[0], rest[1:]
    if first is not None and not re.search(rf"\b{var}\b", log):
        parser.error(f"the log name {log} must contain {var} for a task array")
    return opts, Request(log, words, var, first, last)


# ---- local backend ----


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signum)


class _Children:
    """The task processes running now, so that a stopped launcher stops them too (a task left
    running would outlive its job: Slurm loses track of a process whose parent has gone)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], **kwargs) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(command, **kwargs)
            self.running.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(proc)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every running task, SIGKILL what is left after ``grace`` seconds."""
        with self.lock:
            self.stopping = True
            procs = list(self.running)
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


_children = _Children()


def run_local(task: Task, num_threads: int, echo: bool) -> int:
    """Run one task under bash, writing run.pl's header and footer around its output."""
    task.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads))
    start = time.time()
    with task.log.open("w") as log:
        log.write(f"# {task.command}\n# Started at {time.ctime(start)}\n#\n")
        log.flush()
        proc = _children.start(
            ["bash", "-c", task.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        if proc is None:  # the launcher is stopping
            return 128 + signal.SIGTERM
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            text = chunk.decode(errors="replace")
            log.write(text)
            log.flush()
            if echo:
                sys.stderr.write(text)
                sys.stderr.flush()
        code = proc.wait()
        _children.done(proc)
        elapsed = time.time() - start
        log.write(f"# Accounting: time={elapsed:.0f} threads={num_threads}\n")
        log.write(f"# Ended (code {code}) at {time.ctime()}, elapsed time {elapsed:.0f} seconds\n")
    return code


def launch_local(opts: argparse.Namespace, tasks: list[Task], echo: bool) -> list[str]:
    """Run the tasks here; return the failed tasks' descriptions (their logs).

    Without --num_threads the tasks running at once share the cores this process may run on
    (its CPU affinity: a Slurm allocation's, or taskset's, not the whole machine's): a single
    task gets all of them, an array of tasks on N cores gets N // (tasks at once) threads each.
    """
    cores = len(os.sched_getaffinity(0))
    workers = max(1, min(opts.max_jobs_run or cores, len(tasks)))
    threads = opts.num_threads or max(1, cores // workers)
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[s] = signal.signal(s, _interrupt)
        except ValueError:  # not the main thread: no handlers to install
            pass
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(run_local, t, threads, echo) for t in tasks]
        codes = [f.result() for f in futures]
    except Interrupted:
        pool.shutdown(wait=False, cancel_futures=True)
        _children.stop_all()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        pool.shutdown(wait=True)
    return [str(t.log) for t, c in zip(tasks, codes) if c != 0]


# ---- slurm backend ----


@dataclass
class SlurmConf:
    """A parsed slurm.conf: the submit command, per-option rules and default values."""

    command: list[str]
    rules: dict[tuple[str, str], list[str]]  # (option, value or "*") -> sbatch words
    defaults: dict[str, str]


def parse_slurm_conf(text: str, source: str) -> SlurmConf:
    """Read ESPnet's slurm.conf format: ``command ...``, ``option NAME=VALUE|* ...``
    (``$0`` stands for the value) and ``default NAME=VALUE``; ``#`` starts a comment."""
    command, rules, defaults = None, {}, {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, spec = line.partition(" ")
        spec = spec.strip()
        if kind == "command" and spec:
            command = shlex.split(spec)
            continue
        m = re.fullmatch(r"(\w+)=(\S+)(?:\s+(.*))?", spec)
        if kind == "option" and m:
            rules[(m.group(1), m.group(2))] = shlex.split(m.group(3) or "")
        elif kind == "default" and m and not m.group(3):
            defaults[m.group(1)] = m.group(2)
        else:
            raise LaunchError(
                f"{source}:{n}: cannot read {raw.strip()!r} (expected 'command SBATCH ...', "
                "'option NAME=VALUE ...', 'option NAME=* ... $0 ...' or 'default NAME=VALUE')"
            )
    if command is None:
        raise LaunchError(f"{source}: no 'command' line (e.g. 'command sbatch --export=ALL')")
    return SlurmConf(command, rules, defaults)


def sbatch_args(
    options: dict[str, str | None], conf_text: str, source: str = "slurm.conf"
) -> list[str]:
    """The sbatch command for generic ``options`` (name -> value; None: not given) under a
    slurm.conf text. An exact ``option NAME=VALUE`` rule wins over ``option NAME=*``."""
    conf = parse_slurm_conf(conf_text, source)
    args = list(conf.command)
    names = list(options) + [n for n in conf.defaults if n not in options]
    for name in names:
        value = options.get(name)
        value = conf.defaults.get(name) if value is None else str(value)
        if value is None:
            continue
        words = conf.rules.get((name, value))
        if words is None:
            if (name, "*") not in conf.rules:
                raise LaunchError(
                    f"{source}: no rule for {name}={value} (add e.g. 'option {name}=* ... $0')"
                )
            words = [w.replace("$0", value) for w in conf.rules[(name, "*")]]
        args += words
    return args


def slurm_conf_path(given: str | None) -> Path:
    if given is not None:
        if not Path(given).is_file():
            raise LaunchError(f"--config {given}: no such file")
        return Path(given)
    local = Path("conf/slurm.conf")
    return local if local.is_file() else TOOLKIT_SLURM_CONF


def job_script(request: Request, num_threads: int) -> str:
    """The batch script: each task runs through this launcher's local backend, so it writes
    the same log (header, output, footer) as a local run; Slurm gives the task number."""
    inner = [sys.executable, str(Path(__file__).resolve()), "--backend", "local"]
    inner += ["--num_threads", str(num_threads), "--quiet"]
    words = [shlex.quote(w) for w in inner]
    if request.is_array:
        words.append(f'{request.var}="$SLURM_ARRAY_TASK_ID:$SLURM_ARRAY_TASK_ID"')
    words += [shlex.quote(w) for w in [request.log, *request.words]]
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by launch.py; Slurm runs it in the submitting directory and environment.",
            f"cd {shlex.quote(os.getcwd())} || exit 1",
            "exec " + " ".join(words),
            "",
        ]
    )


def slurm(args: list[str]) -> subprocess.CompletedProcess:
    """Run a Slurm client command, with a clear error when Slurm is not installed."""
    try:
        return subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError(
            f"{args[0]} not found: --backend slurm needs the Slurm client tools "
            "(utils/slurm_cluster.sh start DIR brings up a local cluster)"
        ) from None


def job_active(job_id: str) -> bool:
    """Whether any task of the job is still pending, running or completing."""
    proc = slurm(["squeue", "-h", "-j", job_id, "-o", "%i"])
    if proc.returncode == 0:
        return bool(proc.stdout.strip())
    if "Invalid job id" in proc.stderr:  # already purged from the controller
        return False
    raise LaunchError(f"squeue failed: {proc.stderr.strip()}")


def task_states(job_id: str) -> dict[int | None, str]:
    """Final state of each task (key None for a job that is not an array), from scontrol."""
    proc = slurm(["scontrol", "-o", "show", "job", job_id])
    states: dict[int | None, str] = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        task = re.search(r"\bArrayTaskId=(\S+)", line)
        state = re.search(r"\bJobState=(\S+)", line)
        if state and (task is None or task.group(1).isdigit()):
            states[int(task.group(1)) if task else None] = state.group(1)
    return states


def wait_for_job(job_id: str, on_poll: Callable[[], None]) -> None:
    """Poll squeue until the job has left the queue (tolerating a few failed queries)."""
    delay, errors = 0.1, 0
    while True:
        on_poll()
        try:
            if not job_active(job_id):
                return
            errors = 0
        except LaunchError:
            errors += 1
            if errors >= 10:
                raise
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def cancel(job_id: str) -> None:
    """scancel the job and wait (up to a minute) until it has left the queue."""
    slurm(["scancel", job_id])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and job_active(job_id):
            time.sleep(0.2)
    except LaunchError:
        pass


def log_exit_code(log: Path) -> int | None:
    """The exit code in a log's footer; None when the log or its footer is missing."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    codes = ENDED.findall(tail)
    return int(codes[-1]) if codes else None


class LogEcho:
    """Copies what a log gained since the last call to stderr (a single task's live output)."""

    def __init__(self, log: Path, enabled: bool):
        self.log, self.enabled, self.offset = log, enabled, 0

    def __call__(self) -> None:
        if not self.enabled or not self.log.is_file():
            return
        with self.log.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()


def submit(command: list[str]) -> tuple[str, dict]:
    """Run sbatch; return the job id and the signal handlers replaced by ones that raise
    Interrupted. Signals wait until both are in place, so no job escapes cancellation."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        proc = slurm(command)
        if proc.returncode != 0:
            raise LaunchError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        return proc.stdout.strip().split(";")[0], previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def failures(tasks: list[Task], states: dict[int | None, str], output: Path) -> list[str]:
    """Descriptions of the tasks whose log does not end with code 0 or that Slurm did not
    complete; ``output`` is Slurm's own output file (``%a``: the task number)."""
    failed = []
    for task in tasks:
        state, code = states.get(task.index), log_exit_code(task.log)
        if code == 0 and state in (None, "COMPLETED"):
            continue
        note = f"Slurm state {state or 'unknown'}"
        if code is None:
            note += f", no end line: see also {str(output).replace('%a', str(task.index))}"
        failed.append(f"{task.log} ({note})")
    return failed


def launch_slurm(opts: argparse.Namespace, request: Request, echo: bool) -> list[str]:
    """Submit the tasks as one sbatch job and wait; return the failed tasks' descriptions."""
    conf = slurm_conf_path(opts.config)
    options = {name: getattr(opts, name) for name in GENERIC_OPTIONS}
    command = sbatch_args(options, conf.read_text(), str(conf))
    tasks = request.tasks
    qdir = Path.cwd() / tasks[0].log.parent / "q"
    qdir.mkdir(parents=True, exist_ok=True)
    for task in tasks:  # a stale log must not pass for this run's
        task.log.parent.mkdir(parents=True, exist_ok=True)
        task.log.unlink(missing_ok=True)
    name = Path(request.log).name.removesuffix(".log")
    script = qdir / f"{name}.sh"
    script.write_text(job_script(request, opts.num_threads or 1))
    stem = name
    if request.is_array:  # Slurm's %a: the task number
        stem = substitute(name, request.var, "%a")
        stem += "" if stem != name else ".%a"
    output = qdir / f"{stem}.out"
    command += ["--parsable", f"--job-name={name}", f"--chdir={os.getcwd()}", f"--output={output}"]
    if request.is_array:
        throttle = f"%{opts.max_jobs_run}" if opts.max_jobs_run else ""
        command.append(f"--array={request.first}-{request.last}{throttle}")
    job_id, previous = submit([*command, str(script)])
    follow = LogEcho(tasks[0].log, echo)
    stopped_by = None
    try:
        wait_for_job(job_id, follow)
    except Interrupted as e:
        stopped_by = e
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped_by is not None:
        cancel(job_id)
        print(f"launch.py: cancelled Slurm job {job_id}", file=sys.stderr)
        raise stopped_by
    follow()
    return failures(tasks, task_states(job_id), output)


def main(argv: list[str]) -> int:
    opts, request = parse_args(argv)
    tasks = request.tasks
    echo = not request.is_array and not opts.quiet
    try:
        if opts.backend == "slurm":
            failed = launch_slurm(opts, request, echo)
        else:
            failed = launch_local(opts, tasks, echo)
    except LaunchError as e:
        print(f"launch.py: ERROR: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"launch.py: stopped by signal {e.signum}", file=sys.stderr)
        return 128 + e.signum
    if failed:
        print(
            f"launch.py: {len(failed)} of {len(tasks)} task(s) failed; see {', '.join(failed)}",
            file=sys.stderr,
        )
        logs = {d.split(" (")[0] for d in failed}
        for task in [t for t in tasks if str(t.log) in logs][:3]:
            line = error_line(task.log)
            if line:
                print(f"launch.py: {task.log}: {line}", file=sys.stderr)
        return 1
    return 0


def error_line(log: Path) -> str | None:
    """What a failed task's log says went wrong, to show where the user looks: its last
    error line (comflp's one-line ERROR, a Python exception, a usage error), else its last line
    of output."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    errors = [
        ln
        for ln in body
        if " ERROR " in ln or "error:" in ln or re.match(r"[\w.]*(Error|Exception)\b", ln)
    ]
    return (errors or body or [None])[-1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
