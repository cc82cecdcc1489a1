"""launch.py --backend slurm on a real single-node Slurm cluster (utils/slurm_cluster.sh).

Every test here needs the cluster; they are skipped, with the reason, when it cannot start.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import PYTHON, REPEATABLE_AUDIO, REPO, TINY_OPTIONS, run_cmd
from .test_launch import launch as launch_py

pytestmark = pytest.mark.slurm
LAUNCH = REPO / "utils/launch.py"
CLUSTER = REPO / "utils/slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict:
    """Environment (SLURM_CONF, the virtualenv first on PATH) of a private cluster, stopped at
    the end of the session whatever the tests did."""
    directory = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run(
            [CLUSTER, "start", directory], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            pytest.skip(f"no Slurm cluster: slurm_cluster.sh start failed: {proc.stderr[-800:]}")
        assert proc.stdout.strip() == f"export SLURM_CONF={directory}/slurm.conf"
        path = f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"
        yield {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"), "PATH": path}
    finally:
        subprocess.run([CLUSTER, "stop", directory], capture_output=True, timeout=120)


def squeue(env: dict, fields: str = "%j %T") -> list[str]:
    """The jobs in the (private) cluster's queue: by default their names and states."""
    out = run_cmd(["squeue", "-h", "-o", fields], env=env).stdout
    return out.split("\n")[:-1]


def launch(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_cmd([PYTHON, LAUNCH, "--backend", "slurm", *args], cwd=cwd, env=env, check=False)


def test_task_array_writes_one_log_per_task(tmp_path, slurm_env):
    env = {**slurm_env, "MARKER": "from-the-submitter"}
    task = "echo task JOB of 3 in $PWD $MARKER; command -v python"
    proc = launch(tmp_path, env, "JOB=1:3", "log/array.JOB.log", task)
    assert proc.returncode == 0, proc.stderr
    for i in (1, 2, 3):
        lines = (tmp_path / f"log/array.{i}.log").read_text().splitlines()
        assert lines[0] == f"# echo task {i} of 3 in $PWD $MARKER; command -v python"
        assert lines[1].startswith("# Started at ")
        # The job runs in the submitting directory, with its environment and virtualenv.
        assert lines[3:5] == [f"task {i} of 3 in {tmp_path} from-the-submitter", PYTHON]
        assert re.fullmatch(r"# Ended \(code 0\) at .+, elapsed time \d+ seconds", lines[-1])
    assert (tmp_path / "log/q/array.JOB.sh").is_file()
    assert not any(name.startswith("array.") for name in squeue(env))


def test_single_task_echoes_its_output(tmp_path, slurm_env):
    proc = launch(tmp_path, slurm_env, "one.log", "echo hello from slurm")
    assert proc.returncode == 0, proc.stderr
    assert "hello from slurm\n" in proc.stderr
    assert "# Ended (code 0)" in (tmp_path / "one.log").read_text()


def test_failed_task_fails_the_launcher_and_is_named(tmp_path, slurm_env):
    proc = launch(tmp_path, slurm_env, "JOB=1:3", "log/f.JOB.log", "exit $((JOB == 2 ? 7 : 0))")
    assert proc.returncode == 1
    assert "1 of 3 task(s) failed" in proc.stderr
    assert re.findall(r"log/f\.\d\.log", proc.stderr) == ["log/f.2.log"]
    assert "FAILED" in proc.stderr
    assert "# Ended (code 7)" in (tmp_path / "log/f.2.log").read_text()


def test_task_killed_by_slurm_is_named_with_its_state(tmp_path, slurm_env):
    launcher = subprocess.Popen(
        [PYTHON, LAUNCH, "--backend", "slurm", "JOB=1:2", "log/k.JOB.log", "sleep 311"],
        cwd=tmp_path,
        env=slurm_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (running := [j for j in squeue(slurm_env, "%i %j %T") if "k.JOB RUNNING" in j]):
            assert time.monotonic() < deadline and launcher.poll() is None, "no task started"
            time.sleep(0.2)
        array_id = running[0].split("_")[0]
        run_cmd(["scancel", array_id], env=slurm_env)  # as an administrator would
        _, stderr = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    assert "2 of 2 task(s) failed" in stderr
    for i in (1, 2):
        # A task's own launcher writes its log's end line when the SIGTERM reaches it before
        # Slurm's SIGKILL; without one, the failure points at Slurm's output file too.
        if launch_py.log_exit_code(tmp_path / f"log/k.{i}.log") is not None:
            assert f"log/k.{i}.log (Slurm state CANCELLED)" in stderr
        else:
            assert f"log/k.{i}.log (Slurm state CANCELLED, no end line: see also " in stderr
            assert f"{tmp_path}/log/q/k.{i}.out" in stderr


def test_max_jobs_run_throttles_the_array(tmp_path, slurm_env):
    task = "echo start JOB >> order; sleep 0.5; echo end JOB >> order"
    proc = launch(tmp_path, slurm_env, "--max_jobs_run", "1", "JOB=1:3", "l/JOB.log", task)
    assert proc.returncode == 0, proc.stderr
    events = [e.split()[0] for e in (tmp_path / "order").read_text().splitlines()]
    assert events == ["start", "end"] * 3


def test_sbatch_refusal_is_reported(tmp_path, slurm_env):
    proc = launch(tmp_path, slurm_env, "--time", "not-a-time", "x.log", "true")
    assert proc.returncode == 1
    assert "sbatch failed" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_launcher_cancels_its_jobs(tmp_path, slurm_env, sig):
    name = f"cancel{int(sig)}"
    launcher = subprocess.Popen(
        [PYTHON, LAUNCH, "--backend", "slurm", "JOB=1:3", f"log/{name}.JOB.log", "sleep 313"],
        cwd=tmp_path,
        env=slurm_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while f"{name}.JOB RUNNING" not in squeue(slurm_env):
            assert time.monotonic() < deadline, "the array never started"
            assert launcher.poll() is None, launcher.stderr.read()
            time.sleep(0.2)
        launcher.send_signal(sig)
        _, stderr = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + sig, stderr
    assert "cancelled Slurm job" in stderr
    assert not any(job.startswith(name) for job in squeue(slurm_env))
    # slurmd kills the job steps asynchronously after scancel: give it a few seconds.
    deadline = time.monotonic() + 10
    while sleeping := [
        p for p in Path("/proc").glob("[0-9]*/cmdline") if _cmdline(p) == "sleep 313"
    ]:
        assert time.monotonic() < deadline, f"job processes still running: {sleeping}"
        time.sleep(0.2)


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:  # the process has just gone
        return ""


def _read_gz(path: Path) -> str:
    with gzip.open(path, "rt") as f:
        return f.read()


@pytest.mark.e2e
def test_pipeline_through_slurm_matches_local(tmp_path, slurm_env, pipeline):
    """Stages 0-3 of run.sh through Slurm give what they gave locally (the `pipeline` fixture,
    the same options): same manifests, tokenizer and trained weights."""
    slurm, local = tmp_path / "slurm", pipeline["workdir"]
    slurm.mkdir()
    times = []
    for stage in range(4):
        t0 = time.time()
        run_cmd(
            [REPO / "run.sh", "--stage", stage, "--stop_stage", stage, *TINY_OPTIONS],
            cwd=slurm,
            env={**slurm_env, **REPEATABLE_AUDIO, "cmd_backend": "slurm"},
        )
        times.append(time.time() - t0)
    print("\nper-stage wall time (s), stages 0-3:")
    print("  local " + " ".join(f"{pipeline['times'][s]:6.1f}" for s in range(4)))
    print("  slurm " + " ".join(f"{v:6.1f}" for v in times))
    assert (slurm / "exp/baseline/log/q/train.sh").is_file()  # stage 3 really went through Slurm
    manifests = sorted(p.relative_to(slurm) for p in (slurm / "data").glob("*/cuts_*.jsonl.gz"))
    assert len(manifests) == 6
    for path in manifests:
        assert _read_gz(local / path) == _read_gz(slurm / path), path
    lang = "data/lang_bpe48/tokens.txt"
    assert (local / lang).read_text() == (slurm / lang).read_text()
    a = torch.load(local / "exp/baseline/model.pt", weights_only=False)["model"]
    b = torch.load(slurm / "exp/baseline/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
