"""utils/launch.py without a cluster: the local backend, usage errors, slurm.conf mapping and
the Slurm job script (run here by hand, as Slurm would run one task of it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO, load_script, run_cmd

LAUNCH = REPO / "utils/launch.py"


launch = load_script(LAUNCH, "launch")


def run_launch(cwd: Path, *args: str, check: bool = False, env: dict | None = None):
    return run_cmd([PYTHON, LAUNCH, *args], cwd=cwd, check=check, env=env, timeout=60)


def test_job_is_replaced_in_log_and_command(tmp_path):
    proc = run_launch(tmp_path, "JOB=1:3", "log/task.JOB.log", "echo", "task", "JOB", "JOBS")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == [
        "task.1.log",
        "task.2.log",
        "task.3.log",
    ]
    for i in (1, 2, 3):
        assert f"task {i} JOBS\n" in (tmp_path / f"log/task.{i}.log").read_text()
    assert proc.stderr == ""  # an array does not echo its tasks' output


def test_log_has_run_pl_header_and_footer(tmp_path):
    proc = run_launch(tmp_path, "x.log", "echo hello; echo oops >&2; exit 3")
    assert proc.returncode == 1
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert lines[0] == "# echo hello; echo oops >&2; exit 3"
    assert lines[1].startswith("# Started at ") and lines[2] == "#"
    assert lines[3:5] == ["hello", "oops"]
    assert re.fullmatch(rf"# Accounting: time=\d+ threads={len(os.sched_getaffinity(0))}", lines[5])
    assert re.fullmatch(r"# Ended \(code 3\) at .+, elapsed time \d+ seconds", lines[6])
    assert len(lines) == 7
    # A single task echoes its output to the terminal, unless --quiet.
    assert "hello\noops\n" in proc.stderr
    quiet = run_launch(tmp_path, "--quiet", "y.log", "echo hello")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_threads_are_shared_between_concurrent_tasks(tmp_path):
    cores = len(os.sched_getaffinity(0))  # the cores this test may use, as the launcher counts
    run_launch(tmp_path, "one.log", "echo threads=$OMP_NUM_THREADS")
    assert f"threads={cores}" in (tmp_path / "one.log").read_text()
    run_launch(
        tmp_path, "--max_jobs_run", "2", "JOB=1:3", "arr.JOB.log", "echo threads=$OMP_NUM_THREADS"
    )
    assert f"threads={max(1, cores // 2)}\n" in (tmp_path / "arr.3.log").read_text()
    run_launch(tmp_path, "--num_threads", "3", "set.log", "echo threads=$OMP_NUM_THREADS")
    assert "threads=3\n" in (tmp_path / "set.log").read_text()


def test_threads_follow_the_cores_the_launcher_may_use(tmp_path):
    """Started on one core (taskset, a Slurm allocation), a task gets one thread, not one per
    core of the machine."""
    one = min(os.sched_getaffinity(0))
    subprocess.run(
        [PYTHON, LAUNCH, "one.log", "echo threads=$OMP_NUM_THREADS"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
        check=True,
    )
    assert "threads=1\n" in (tmp_path / "one.log").read_text()


def test_failed_tasks_are_named(tmp_path):
    proc = run_launch(tmp_path, "JOB=1:4", "log/t.JOB.log", "exit $((JOB % 2 ? 5 : 0))")
    assert proc.returncode == 1
    assert "2 of 4 task(s) failed" in proc.stderr
    named = set(re.findall(r"log/t\.(\d)\.log", proc.stderr))
    assert named == {"1", "3"}
    assert "# Ended (code 5)" in (tmp_path / "log/t.3.log").read_text()
    assert "# Ended (code 0)" in (tmp_path / "log/t.2.log").read_text()


def test_a_failed_task_shows_its_error_line_where_the_user_looks(tmp_path):
    script = "echo 'INFO starting'; echo '2026 ERROR [cli] --fine_metric bleu: unknown' >&2; exit 1"
    proc = run_launch(tmp_path, "--quiet", "log/a.log", script)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "launch.py: log/a.log: 2026 ERROR [cli] --fine_metric bleu: unknown"
    )
    proc = run_launch(tmp_path, "--quiet", "log/b.log", "echo 'ValueError: bad' >&2; exit 1")
    assert proc.stderr.splitlines()[-1] == "launch.py: log/b.log: ValueError: bad"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_local_launcher_stops_its_tasks(tmp_path, sig):
    """Slurm's scancel signals the job's launcher; a task it left running would be orphaned."""
    launcher = subprocess.Popen(
        [
            PYTHON,
            LAUNCH,
            "--max_jobs_run",
            "1",
            "JOB=1:3",
            "log/s.JOB.log",
            "echo $$ > pid.JOB; exec sleep 317",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid.1").is_file() or not (tmp_path / "pid.1").read_text():
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        pid = int((tmp_path / "pid.1").read_text())
        launcher.send_signal(sig)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + sig, stderr
    assert f"stopped by signal {int(sig)}" in stderr
    assert not Path(f"/proc/{pid}").exists()  # the running task is gone ...
    assert not (tmp_path / "pid.2").exists()  # ... and the queued ones never started
    assert "# Ended (code -15)" in (tmp_path / "log/s.1.log").read_text()


def test_command_options_are_not_taken_for_the_launchers(tmp_path):
    proc = run_launch(tmp_path, "--num_threads", "3", "x.log", "echo", "--gpu", "2", "--mem", "1G")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "x.log").read_text()
    assert "--gpu 2 --mem 1G\n" in text and "threads=3" in text


def test_num_threads_reaches_the_task(tmp_path):
    run_launch(tmp_path, "--num_threads", "2", "x.log", "echo omp=$OMP_NUM_THREADS", check=True)
    assert "omp=2\n" in (tmp_path / "x.log").read_text()


def test_max_jobs_run_1_runs_tasks_one_after_another(tmp_path):
    task = "echo start JOB >> order; sleep 0.2; echo end JOB >> order"
    run_launch(tmp_path, "--max_jobs_run", "1", "JOB=1:3", "l/JOB.log", task, check=True)
    events = (tmp_path / "order").read_text().split("\n")[:-1]
    starts_and_ends = [e.split()[0] for e in events]
    assert starts_and_ends == ["start", "end"] * 3


def test_max_jobs_run_2_runs_two_tasks_at_once(tmp_path):
    # Each task waits (up to 20 s) for the other one to have started: both must run at once.
    task = (
        "touch started.JOB; for i in $(seq 200); do [ $(ls started.* | wc -l) -ge 2 ] && exit 0;"
        " sleep 0.1; done; exit 1"
    )
    proc = run_launch(tmp_path, "--max_jobs_run", "2", "JOB=1:2", "l/JOB.log", task)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "expected LOG and a command"),
        (["x.log"], "expected LOG and a command"),
        (["JOB=1:3"], "expected LOG and a command"),
        (["JOB=3:1", "x.JOB.log", "true"], "empty task range JOB=3:1"),
        (["JOB=1-3", "x.JOB.log", "true"], "bad task range JOB=1-3"),
        (["JOB=1:2", "x.log", "true"], "the log name x.log must contain JOB"),
        (["JOB=1:2", "JOBS/x.log", "true"], "the log name JOBS/x.log must contain JOB"),
        (["--backend", "sge", "x.log", "true"], "invalid choice: 'sge'"),
        (["--max_jobs_run", "0", "x.log", "true"], "--max_jobs_run must be at least 1"),
        (["--num_threads", "x", "x.log", "true"], "invalid int value"),
        (["--frobnicate", "1", "x.log", "true"], "unrecognized arguments: --frobnicate"),
        (["--num", "2", "x.log", "true"], "unrecognized arguments: --num"),
    ],
)
def test_bad_usage_is_refused(tmp_path, args, message):
    proc = run_launch(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran


CONF = """
# a test configuration
command sbatch --export=ALL --no-requeue   # every job
option time=* --time $0
option mem=* --mem-per-cpu $0
option mem=0                               # no flag at all
option num_threads=* --cpus-per-task $0
option num_threads=1 --cpus-per-task 1 --hint=nomultithread
default gpu=0
option gpu=0 -p cpu
option gpu=* -p gpu --gres=gpu:$0
"""


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, ["-p", "cpu"]),
        ({"gpu": "2"}, ["-p", "gpu", "--gres=gpu:2"]),
        (
            {"mem": "8G", "time": "4:00:00"},
            ["--mem-per-cpu", "8G", "--time", "4:00:00", "-p", "cpu"],
        ),
        ({"mem": "0"}, ["-p", "cpu"]),
        ({"num_threads": 1}, ["--cpus-per-task", "1", "--hint=nomultithread", "-p", "cpu"]),
        ({"num_threads": 4, "gpu": None}, ["--cpus-per-task", "4", "-p", "cpu"]),
    ],
)
def test_sbatch_args_from_conf(options, expected):
    assert launch.sbatch_args(options, CONF) == [
        "sbatch",
        "--export=ALL",
        "--no-requeue",
        *expected,
    ]


@pytest.mark.parametrize(
    "conf, options, message",
    [
        (CONF, {"mem": "8G", "exclusive": "1"}, "no rule for exclusive=1"),
        ("command sbatch\noption gpu=0\n", {"gpu": "1"}, "no rule for gpu=1"),
        ("option gpu=0\n", {}, "no 'command' line"),
        ("command sbatch\nopt gpu=0\n", {}, "t.conf:2: cannot read 'opt gpu=0'"),
        ("command sbatch\ndefault gpu=0 -p x\n", {}, "t.conf:2: cannot read"),
        ("command sbatch\noption --account=x\n", {}, "t.conf:2: cannot read"),
    ],
)
def test_bad_conf_or_unmapped_option_is_refused(conf, options, message):
    with pytest.raises(launch.LaunchError, match=re.escape(message)):
        launch.sbatch_args(options, conf, "t.conf")


def test_toolkit_slurm_conf_maps_the_generic_options():
    text = (REPO / "conf/slurm.conf").read_text()
    options = {"gpu": None, "mem": "8G", "time": "4:00:00", "num_threads": 4}
    assert launch.sbatch_args(options, text) == [
        "sbatch",
        "--export=ALL",
        "--mem",
        "8G",
        "--time",
        "4:00:00",
        "--cpus-per-task",
        "4",
    ]
    assert launch.sbatch_args({"gpu": "1"}, text)[2:] == ["-p", "gpu", "--gres=gpu:1"]


def test_job_script_runs_one_task_as_slurm_would(tmp_path, monkeypatch):
    """The batch script, run with SLURM_ARRAY_TASK_ID set, writes that task's run.pl log."""
    monkeypatch.chdir(tmp_path)
    _, request = launch.parse_args(["JOB=1:3", "log/t.JOB.log", "echo", "task JOB", "in", "$PWD"])
    script = tmp_path / "job.sh"
    script.write_text(launch.job_script(request, num_threads=2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2"}
    subprocess.run(["bash", script], cwd=elsewhere, env=env, check=True, timeout=60)
    assert not (tmp_path / "log/t.1.log").exists()
    text = (tmp_path / "log/t.2.log").read_text()
    assert text.startswith("# echo 'task 2' in '$PWD'\n")
    assert "task 2 in $PWD\n" in text and "threads=2" in text and "# Ended (code 0)" in text


def test_slurm_backend_without_slurm_says_so(tmp_path, env_without):
    env = env_without({"sbatch", "squeue", "scontrol", "scancel"})
    proc = run_launch(tmp_path, "--backend", "slurm", "x.log", "true", env=env)
    assert proc.returncode == 1
    assert "sbatch not found" in proc.stderr and "slurm_cluster.sh" in proc.stderr


def test_slurm_backend_refuses_a_missing_config(tmp_path):
    proc = run_launch(tmp_path, "--backend", "slurm", "--config", "nope.conf", "x.log", "true")
    assert proc.returncode == 1
    assert "--config nope.conf: no such file" in proc.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--model_type",
            "no_such_type",
            "--model_type no_such_type: unknown no_such_type; choose from ctranslate2, espnet, hf, native, whisper",
        ),
        ("--fine_metric", "bleu", "--fine_metric bleu: unknown bleu; choose from cer, wer, loss"),
        ("--scores", "residual_sum cka2", "--scores residual_sum cka2: unknown cka2; choose from"),
        (
            "--score_conf",
            "dc.batchsize=8",
            "--score_conf dc.batchsize=8: score dc takes the options batch_size=32",
        ),
    ],
)
def test_run_sh_checks_closed_set_options_before_any_job(tmp_path, option, value, message):
    proc = run_cmd(
        [REPO / "run.sh", "--stage", "4", "--stop_stage", "7", option, value],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 1 and len(errors) == 1 and message in errors[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # no job started, nothing written


def test_run_sh_checks_the_decoding_method_against_the_model_type(tmp_path):
    proc = run_cmd(
        [REPO / "run.sh", "--stage", "7", "--stop_stage", "7", "--model_type", "whisper"]
        + ["--decoding_method", "ctc_greedy_search"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        "unknown ctc_greedy_search for --model_type whisper; choose from attention_greedy_search"
        in proc.stderr
    )
    assert list(tmp_path.iterdir()) == []
