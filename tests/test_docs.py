"""Generated figures in README.md and docs/: current on the tree, a deliberately edited figure
caught, regenerated from its results file."""

from __future__ import annotations

import re
import shutil

import pytest

from comflp.errors import InputError
from comflp.report.docs import regenerate, stale

from .conftest import PYTHON, REPO, run_cmd

SOURCE = "docs/results/builtin/RESULTS.md"


def test_every_generated_figure_matches_its_results_file():
    assert stale(REPO) == []


def _copy(tmp_path):
    """README.md and every results file its markers read, in a scratch repository."""
    text = (REPO / "README.md").read_text()
    sources = {m.split("#")[0] for m in re.findall(r"<!-- (?:table|value): (.+?) ::", text)}
    assert SOURCE in sources
    for name in ("README.md", *sources):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "README.md"


def test_an_edited_figure_is_caught_and_regenerated(tmp_path):
    readme = _copy(tmp_path)
    text = readme.read_text()
    row = "| oracle | 6 | 7 8 9 10 11 12 | 53.83 | 14.41 |"
    assert (
        row in text and "took <!-- value: docs/results/builtin/RESULTS.md :: method=oracle" in text
    )
    readme.write_text(text.replace(row, row.replace("14.41", "14.46")))
    assert stale(tmp_path) == ["README.md"]
    assert regenerate(tmp_path, readme) == text
    source = tmp_path / SOURCE  # a new sitting: the document follows it
    source.write_text(source.read_text().replace("| 126.5 | 924 |", "| 126.9 | 924 |"))
    regenerated = regenerate(tmp_path, tmp_path / "README.md")
    assert "took <!-- value: " in regenerated and "-->126.9<!-- /value -->" in regenerated
    assert "| 0.0027 | 126.9 | 924 |" in regenerated


def test_check_fails_in_one_line_and_writes_nothing(tmp_path):
    readme = _copy(tmp_path)
    edited = readme.read_text().replace("-->12.77<!-- /value -->", "-->12.07<!-- /value -->")
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


def test_a_table_is_chosen_by_number_or_heading_and_its_columns_by_name(tmp_path):
    (tmp_path / "r.md").write_text(
        "# r\n\n| a | b |\n| --- | ---: |\n| x | 1 |\n\n## P = 6\n\ntext\n\n"
        "| a | b | c |\n| --- | --- | ---: |\n| x | 2 | 3 |\n| y | 4 | 5 |\n"
    )
    doc = tmp_path / "docs" / "d.md"
    doc.parent.mkdir()
    doc.write_text(
        "<!-- table: r.md#P = 6 :: a=y :: c, a -->\n<!-- /table -->\n"
        "<!-- value: r.md#2 :: a=x :: b -->?<!-- /value --> and "
        "<!-- value: r.md :: a=x :: b -->?<!-- /value -->\n"
    )
    assert regenerate(tmp_path, doc) == (
        "<!-- table: r.md#P = 6 :: a=y :: c, a -->\n| c | a |\n| ---: | --- |\n| 5 | y |\n"
        "<!-- /table -->\n<!-- value: r.md#2 :: a=x :: b -->2<!-- /value --> and "
        "<!-- value: r.md :: a=x :: b -->1<!-- /value -->\n"
    )
    for marker, error in (
        ("r.md#P = 4 :: - :: a", "no heading 'P = 4'"),
        ("r.md#3 :: - :: a", "no markdown table 3"),
        ("r.md#2 :: - :: a, d", "no column 'd' in r.md#2"),
    ):
        doc.write_text(f"<!-- table: {marker} -->\n<!-- /table -->\n")
        with pytest.raises(InputError, match=error):
            regenerate(tmp_path, doc)


def test_the_module_list_follows_the_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text('"""Does a (Smith et al. 2020). More here."""\n')
    (pkg / "sub" / "__init__.py").write_text('"""The sub package.\n\nDetails."""\n')
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    doc = tmp_path / "d.md"
    doc.write_text("<!-- modules: pkg -->\nstale\n<!-- /modules -->\n")
    assert regenerate(tmp_path, doc) == (
        "<!-- modules: pkg -->\n- `pkg/a.py`: Does a (Smith et al. 2020).\n"
        "- `pkg/sub`: The sub package.\n- `pkg/sub/b.py`: (no docstring)\n<!-- /modules -->\n"
    )
    doc.write_text(regenerate(tmp_path, doc))
    (pkg / "c.py").write_text('"""A new module."""\n')  # a module added: the list is stale
    again = regenerate(tmp_path, doc)
    assert again != doc.read_text() and "- `pkg/c.py`: A new module." in again
