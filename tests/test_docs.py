"""Generated figures in README.md and docs/: current on the tree, a deliberately edited figure
caught, regenerated from its results file."""

from __future__ import annotations

import shutil

from comflp.report.docs import regenerate, stale

from .conftest import PYTHON, REPO, run_cmd

SOURCE = "docs/results/builtin/RESULTS_consensus.md"


def test_every_generated_figure_matches_its_results_file():
    assert stale(REPO) == []


def _copy(tmp_path):
    for name in ("README.md", SOURCE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "README.md"


def test_an_edited_figure_is_caught_and_regenerated(tmp_path):
    readme = _copy(tmp_path)
    text = readme.read_text()
    row = "| oracle | 6 | 7 8 9 10 11 12 | 54.82 | 14.64 |"
    assert row in text and "the oracle's <!-- value:" in text
    readme.write_text(text.replace(row, row.replace("14.64", "14.46")))
    assert stale(tmp_path) == ["README.md"]
    assert regenerate(tmp_path, readme) == text
    source = tmp_path / SOURCE  # a new sitting: the document follows it
    source.write_text(source.read_text().replace("| 54.82 | 14.64 |", "| 54.82 | 14.61 |"))
    regenerated = regenerate(tmp_path, tmp_path / "README.md")
    assert "the oracle's <!-- value: " in regenerated and "-->14.61<!-- /value -->" in regenerated
    assert "| oracle | 6 | 7 8 9 10 11 12 | 54.82 | 14.61 |" in regenerated


def test_check_fails_in_one_line_and_writes_nothing(tmp_path):
    readme = _copy(tmp_path)
    edited = readme.read_text().replace("-->12.68<!-- /value -->", "-->12.86<!-- /value -->")
    readme.write_text(edited)
    check = run_cmd(
        [PYTHON, REPO / "bin/docs.py", "--check", "true", "--root", tmp_path], check=False
    )
    errors = [line for line in check.stderr.splitlines() if "ERROR" in line]
    assert check.returncode == 1 and len(errors) == 1 and "README.md" in errors[0]
    assert readme.read_text() == edited
    bad = edited.replace(
        ":: method=unpruned :: dev-clean CER -->", ":: method=unpruned :: dev CER -->"
    )
    readme.write_text(bad)
    broken = run_cmd([PYTHON, REPO / "bin/docs.py", "--root", tmp_path], check=False)
    errors = [line for line in broken.stderr.splitlines() if "ERROR" in line]
    assert broken.returncode == 1 and len(errors) == 1, broken.stderr
    assert "README.md:" in errors[0] and "'dev CER' missing" in errors[0]
    assert readme.read_text() == bad
