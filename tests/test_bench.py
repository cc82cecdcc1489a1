"""The benchmark scripts' own logic (bench/), on made-up inputs."""

from __future__ import annotations

import sys

import pytest

from comflp.cli import UsageError

from .conftest import REPO, load_script

sys.path.insert(0, str(REPO / "bench"))  # the scripts import their shared helpers as `common`
main_job_times = load_script(REPO / "bench" / "main_job_times.py", "main_job_times")

LOG = """\
2026-12-07 23:56:00 (run.sh:168) Stage 0: data preparation
espeak-ng train-clean-100:   8%|
2026-12-07 23:57:09 (run.sh:183) Stage 1: fbank
2026-12-07 23:57:26 (run.sh:201) Stage 3: train the baseline
2026-12-08 00:04:02 (run.sh:207) Stage 3 done: exp/baseline/model.pt
2026-12-08 00:04:10 (run.sh:262) Stage 6: comflp search
2026-12-08 00:04:14 (run.sh:262) Stage 6: glp search
2026-12-08 00:07:11 (run.sh:319) Finished stages 0..6
"""


def test_main_job_times_split_the_run_at_each_stages_first_line():
    spans, total = main_job_times.stage_spans(LOG.splitlines())
    assert [(k, s) for k, _, s in spans] == [(0, 69.0), (1, 17.0), (3, 404.0), (6, 181.0)]
    assert spans[3][1] == "comflp search; glp search"  # "Stage 3 done" is not a stage line
    assert total == 671.0 and main_job_times.min_s(total) == "11:11"
    with pytest.raises(UsageError, match="'Finished stages' line"):
        main_job_times.stage_spans(LOG.splitlines()[:-1])
