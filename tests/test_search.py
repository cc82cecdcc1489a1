"""Coarse search of CoMFLP (comflp.prune.search) and its entry point bin/search.py."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comflp.errors import InputError
from comflp.prune.search import (
    Proposal,
    blocks_of,
    coarse_search,
    format_proposals,
    layers_of,
    score_proposal,
    validate_matrix,
)
from comflp.prune.searches import SearchSettings
from comflp.settings import add_settings, from_args
from comflp.stages.search import search

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests/data/comflp_aishell1"  # published with the paper: its README
SCRIPT = ROOT / "bin/search.py"

# the greedy path of the published CoMFLP log (12 -> 6 layers, DC with batches of 32)
PUBLISHED_GREEDY_PATH = [
    [(9, 9)],
    [(3, 3), (9, 9)],
    [(3, 3), (7, 7), (9, 9)],
    [(3, 3), (7, 7), (9, 9), (11, 11)],
    [(1, 1), (3, 3), (7, 7), (9, 9), (11, 11)],
    [(1, 1), (3, 4), (7, 7), (9, 9), (11, 11)],
]


@pytest.fixture(scope="module")
def reference() -> Path:
    return REFERENCE


def load_reference(reference: Path, name: str) -> np.ndarray:
    return np.load(reference / name)


# --- blocks and scores ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "blocks"),
    [
        ([1], [(1, 1)]),
        ([1, 3, 4], [(1, 1), (3, 4)]),
        ([4, 3, 1], [(1, 1), (3, 4)]),
        ([2, 3, 4, 7, 9, 10, 12], [(2, 4), (7, 7), (9, 10), (12, 12)]),
        (list(range(1, 13)), [(1, 12)]),
        ([], []),
    ],
)
def test_blocks_of(layers, blocks):
    assert blocks_of(layers) == blocks
    assert layers_of(blocks) == tuple(sorted(layers))


def test_blocks_of_rejects_repeated_layers():
    with pytest.raises(ValueError, match="distinct"):
        blocks_of([3, 3, 4])


def test_layers_of_rejects_bad_blocks():
    with pytest.raises(ValueError, match="ends before it starts"):
        layers_of([(4, 2)])
    with pytest.raises(ValueError, match="overlap"):
        layers_of([(1, 3), (3, 4)])


def small_matrix() -> np.ndarray:
    """5 x 5 (4 layers) with M[i][j] = 10 i + j, so every entry names its position."""
    i, j = np.indices((5, 5))
    return (10 * i + j).astype(float)


@pytest.mark.parametrize(
    ("layers", "score"),
    [
        ([1], 1.0),  # M[0][1]
        ([2, 3], 13.0),  # block [2..3]: M[1][3]
        ([1, 3, 4], (1.0 + 24.0) / 2),  # blocks [1..1], [3..4]: M[0][1], M[2][4]
        ([1, 3], (1.0 + 23.0) / 2),
        ([1, 2, 3, 4], 4.0),  # M[0][4]
    ],
)
def test_score_proposal_by_hand(layers, score):
    assert score_proposal(small_matrix(), layers) == score


@pytest.mark.parametrize("layers", [[], [0, 1], [2, 5]])
def test_score_proposal_rejects_layers_out_of_range(layers):
    with pytest.raises(ValueError, match=r"subset of 1\.\.4"):
        score_proposal(small_matrix(), layers)


# --- Proposal -------------------------------------------------------------------------------


def test_proposal_normalises_and_round_trips():
    p = Proposal((4, 1, 3), np.float32(0.5))
    assert p.layers == (1, 3, 4)
    assert p.blocks == [(1, 1), (3, 4)]
    assert type(p.score) is float
    d = p.to_dict()
    assert d == {"layers": [1, 3, 4], "blocks": [[1, 1], [3, 4]], "score": 0.5}
    assert Proposal.from_dict(json.loads(json.dumps(d))) == p
    assert Proposal.from_dict({"blocks": [[1, 1], [3, 4]], "score": 0.5}) == p
    assert Proposal.from_dict({"layers": [3, 1, 4], "score": 0.5}) == p
    assert hash(p) == hash(Proposal((1, 3, 4), 0.5))


def test_proposal_rejects_bad_input():
    with pytest.raises(ValueError, match="do not match"):
        Proposal.from_dict({"layers": [1, 2], "blocks": [[1, 1]], "score": 0.5})
    with pytest.raises(ValueError, match="'layers' or 'blocks'"):
        Proposal.from_dict({"score": 0.5})
    for layers in [(), (0, 1), (2, 2)]:
        with pytest.raises(ValueError, match="distinct layer numbers"):
            Proposal(layers, 0.5)


def test_format_proposals():
    table = format_proposals([Proposal((1, 3, 4), 0.97101), Proposal((2,), 0.5)])
    assert table.splitlines() == [
        "rank       score  blocks",
        "   1    0.971010  1 3-4",
        "   2    0.500000  2",
    ]


# --- validate_matrix ------------------------------------------------------------------------


def with_entry(value: float) -> np.ndarray:
    m = np.eye(4)
    m[1, 2] = value
    return m


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.ones(4), r"2-D square array, got shape \(4,\)"),
        (np.ones((3, 4)), r"2-D square array, got shape \(3, 4\)"),
        (np.ones((2, 3, 3)), "2-D square"),
        (np.ones((2, 2)), "2 x 2: need at least 3 x 3"),
        ([["a", "b", "c"]] * 3, "numeric"),
        (with_entry(np.nan), r"1 non-finite entries \(NaN or inf\), the first at \[1, 2\]"),
        (with_entry(-np.inf), "non-finite"),
    ],
)
def test_validate_matrix_rejects(matrix, message):
    with pytest.raises(ValueError, match=message):
        validate_matrix(matrix)


def test_validate_matrix_checks_the_model_size():
    m = np.eye(13, dtype=np.float32)
    checked = validate_matrix(m, num_layers=12)
    assert checked.dtype == np.float64 and checked.shape == (13, 13)
    with pytest.raises(ValueError, match="12-layer encoder, but the model has 24 layers"):
        validate_matrix(m, num_layers=24)
    with pytest.raises(ValueError, match="expected 25 x 25"):
        validate_matrix(m, num_layers=24)


# --- coarse_search: the published reference ---------------------------------------------------


@pytest.mark.parametrize("mode", ["exhaustive", "beam"])
def test_reproduces_published_top10(reference, mode):
    expected = json.loads((reference / "expected_dc_bs32_prune6_top10.json").read_text())
    matrix = load_reference(reference, expected["matrix"])
    found = coarse_search(matrix, expected["num_prune"], mode=mode, beam_size=10, top_k=10)
    assert [p.blocks for p in found] == [
        [tuple(b) for b in e["blocks"]] for e in expected["proposals"]
    ]
    for p, e in zip(found, expected["proposals"], strict=True):
        assert np.float32(p.score) == np.float32(e["score"])
        assert p.score == pytest.approx(e["score"], rel=1e-12, abs=0)
        assert Proposal.from_dict(e).layers == p.layers


def test_greedy_follows_published_path(reference):
    matrix = load_reference(reference, "dc_mean_bs32_iter10.npy")
    for num_prune, blocks in enumerate(PUBLISHED_GREEDY_PATH, 1):
        (found,) = coarse_search(matrix, num_prune, mode="greedy", top_k=1)
        assert found.blocks == blocks


@pytest.mark.parametrize(
    "name", ["dc_mean_bs32_iter10.npy", "dc_mean_bs4_iter10.npy", "svcca_9600U_thre0.99.npy"]
)
def test_beam_consistent_with_exhaustive_on_reference(reference, name):
    matrix = load_reference(reference, name)
    for num_prune in range(1, 12):
        exhaustive = coarse_search(matrix, num_prune, mode="exhaustive")
        beam = coarse_search(matrix, num_prune, mode="beam")
        assert len(exhaustive) == min(10, math.comb(12, num_prune))
        assert 1 <= len(beam) <= len(exhaustive)  # the last step may have fewer distinct sets
        assert beam[0].score <= exhaustive[0].score
        for p in beam + exhaustive:
            assert len(p.layers) == num_prune
            assert p.score == score_proposal(matrix, p.layers)


def test_beam_misses_the_best_on_svcca_prune9(reference):
    """Beam search is not exact: on this published matrix it loses 0.0041 against exhaustive."""
    matrix = load_reference(reference, "svcca_9600U_thre0.99.npy")
    beam = coarse_search(matrix, 9, mode="beam")[0]
    best = coarse_search(matrix, 9, mode="exhaustive")[0]
    assert best.score - beam.score == pytest.approx(0.0041139, abs=1e-6)


# --- coarse_search: properties on random matrices ----------------------------------------------


@st.composite
def search_cases(draw) -> tuple[np.ndarray, int]:
    num_layers = draw(st.integers(3, 8))
    num_prune = draw(st.integers(1, num_layers - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((num_layers + 1, num_layers + 1)), num_prune


@settings(max_examples=30, deadline=None)
@given(case=search_cases(), beam_size=st.integers(1, 5))
def test_beam_against_exhaustive(case, beam_size):
    matrix, num_prune = case
    num_layers = matrix.shape[0] - 1
    count = math.comb(num_layers, num_prune)
    exhaustive = coarse_search(matrix, num_prune, mode="exhaustive", top_k=count + 5)
    beam = coarse_search(matrix, num_prune, beam_size=beam_size, top_k=beam_size)

    assert len(exhaustive) == count
    assert len({p.layers for p in exhaustive}) == count
    assert exhaustive[0].score >= beam[0].score
    for found in (exhaustive, beam):
        scores = [p.score for p in found]
        assert scores == sorted(scores, reverse=True)
        assert len({p.layers for p in found}) == len(found)
        for p in found:
            assert len(p.layers) == num_prune
            assert 1 <= p.layers[0] and p.layers[-1] <= num_layers
            assert p.score == score_proposal(matrix, p.layers)


@settings(max_examples=30, deadline=None)
@given(case=search_cases())
def test_beam_wide_enough_is_exhaustive(case):
    matrix, num_prune = case
    num_layers = matrix.shape[0] - 1
    count = math.comb(num_layers, num_prune)
    widest = math.comb(num_layers, num_layers // 2)
    exhaustive = coarse_search(matrix, num_prune, mode="exhaustive", top_k=count)
    beam = coarse_search(matrix, num_prune, beam_size=widest, top_k=count)
    assert [p.score for p in beam] == [p.score for p in exhaustive]
    assert {p.layers for p in beam} == {p.layers for p in exhaustive}


# --- greedy, top_k and ties ---------------------------------------------------------------------


def test_greedy_returns_extensions_of_its_path(reference):
    matrix = load_reference(reference, "dc_mean_bs32_iter10.npy")
    found = coarse_search(matrix, 6, mode="greedy", top_k=4)
    assert len(found) == 4
    assert found[0] == coarse_search(matrix, 6, mode="greedy", top_k=1)[0]
    path = set(layers_of(PUBLISHED_GREEDY_PATH[4]))  # the greedy choice after 5 steps
    assert all(path < set(p.layers) for p in found)
    assert [p.score for p in found] == sorted((p.score for p in found), reverse=True)
    # greedy is a beam of one, whatever beam_size says
    assert coarse_search(matrix, 6, mode="greedy", beam_size=7, top_k=4) == found
    assert coarse_search(matrix, 6, mode="beam", beam_size=1, top_k=4) == found


def test_beam_top_k_beyond_beam_size_extends_the_last_ranking(reference):
    matrix = load_reference(reference, "dc_mean_bs32_iter10.npy")
    wide = coarse_search(matrix, 6, beam_size=2, top_k=5)
    assert len(wide) == 5
    assert wide[:2] == coarse_search(matrix, 6, beam_size=2, top_k=2)


def test_top_k_larger_than_the_candidates():
    matrix = small_matrix()
    assert len(coarse_search(matrix, 3, mode="exhaustive", top_k=100)) == 4
    assert len(coarse_search(matrix, 3, mode="beam", beam_size=10, top_k=100)) == 4


def test_ties_keep_generation_order():
    flat = np.ones((5, 5))
    exhaustive = coarse_search(flat, 2, mode="exhaustive")
    assert [p.layers for p in exhaustive] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    # beam of 2 keeps layers 1 and 2 after step 1; their extensions in generation order,
    # (1, 2) reached twice and kept once
    beam = coarse_search(flat, 2, beam_size=2)
    assert [p.layers for p in beam] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4)]

    two_best = np.ones((5, 5))
    two_best[2, 3] = two_best[3, 4] = 2.0  # layers 3 and 4 tie for best, layers 1 and 2 tie
    for mode in ("exhaustive", "beam", "greedy"):
        found = coarse_search(two_best, 1, mode=mode)
        assert [p.layers for p in found] == [(3,), (4,), (1,), (2,)]


# --- coarse_search: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_prune": 0}, "num_prune must be between 1 and 3, got 0"),
        ({"num_prune": 4}, "num_prune must be between 1 and 3, got 4"),
        ({"num_prune": 2.0}, "num_prune must be an integer"),
        ({"beam_size": 0}, "beam_size must be >= 1, got 0"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"mode": "random"}, "unknown search mode 'random': choose one of beam, greedy, exh"),
        ({"max_exhaustive": 0}, "max_exhaustive must be >= 1"),
    ],
)
def test_coarse_search_rejects(options, message):
    kwargs = {"num_prune": 2, **options}
    with pytest.raises(ValueError, match=message):
        coarse_search(small_matrix(), **kwargs)


def test_exhaustive_refuses_too_many_proposals():
    matrix = np.eye(25)
    with pytest.raises(ValueError, match=r"C\(24, 12\) = 2704156 proposals exceeds max_exhaustive"):
        coarse_search(matrix, 12, mode="exhaustive")
    with pytest.raises(ValueError, match="raise max_exhaustive"):
        coarse_search(np.eye(13), 6, mode="exhaustive", max_exhaustive=923)
    assert len(coarse_search(np.eye(13), 6, mode="exhaustive", max_exhaustive=924)) == 10


def test_coarse_search_rejects_a_bad_matrix():
    with pytest.raises(ValueError, match="non-finite"):
        coarse_search(with_entry(np.nan), 1)


# --- bin/search.py ------------------------------------------------------------------------------


def coarse_cli(argv: list[str]) -> None:
    """bin/search.py's core on a command line, as its entry point parses it."""
    parser = argparse.ArgumentParser()
    add_settings(parser, SearchSettings)
    search(from_args(SearchSettings, parser.parse_args(argv)))


@pytest.fixture
def matrix_file(tmp_path) -> Path:
    path = tmp_path / "matrix.npy"
    np.save(path, small_matrix())
    return path


def test_cli_writes_proposals(matrix_file, tmp_path, capsys):
    output = tmp_path / "out/proposals.json"
    coarse_cli(
        ["--matrix", str(matrix_file), "--num_prune", "2", "--top_k", "3", "--output", str(output)]
    )
    expected = [p.to_dict() for p in coarse_search(small_matrix(), 2, top_k=3)]
    assert json.loads(output.read_text()) == expected
    assert expected[1] == {"layers": [2, 4], "blocks": [[2, 2], [4, 4]], "score": 23.0}
    assert capsys.readouterr().out.splitlines()[1:] == [
        "   1   24.000000  3-4",
        "   2   23.000000  2 4",
        "   3   17.500000  1 4",
    ]
    assert sorted(q.name for q in output.parent.iterdir()) == ["proposals.json"]


def test_cli_damage_aggregation(matrix_file, tmp_path):
    output = tmp_path / "damage.json"
    coarse_cli(
        ["--matrix", str(matrix_file), "--num_prune", "2", "--top_k", "4", "--output", str(output)]
        + ["--aggregation", "damage"]
    )
    damage = [p.to_dict() for p in coarse_search(small_matrix(), 2, top_k=4, aggregation="damage")]
    assert json.loads(output.read_text()) == damage
    mean = [p.to_dict() for p in coarse_search(small_matrix(), 2, top_k=4)]
    assert [p["layers"] for p in damage] != [p["layers"] for p in mean]


def write_bad_inputs(tmp_path: Path) -> dict[str, Path]:
    files = {
        "nonsquare": tmp_path / "nonsquare.npy",
        "nan": tmp_path / "nan.npy",
        "text": tmp_path / "matrix.txt",
        "npz": tmp_path / "matrix.npz",
    }
    np.save(files["nonsquare"], np.ones((3, 4)))
    np.save(files["nan"], with_entry(np.nan))
    files["text"].write_text("0.5 0.6\n")
    np.savez(files["npz"], m=np.eye(4))
    return files


@pytest.mark.parametrize(
    ("matrix", "options", "message"),
    [
        ("nonsquare", [], r"--matrix correlation matrix must be a 2-D square array"),
        ("nan", [], r"--matrix correlation matrix has 1 non-finite entries"),
        ("text", [], r"--matrix a score file ends in \.npy or \.npz, got 'matrix\.txt'"),
        ("npz", [], r"--matrix .*matrix\.npz: expected the arrays top_sq, proj, gram, found m"),
        ("missing", [], r"--matrix .*missing\.npy: no such file"),
        ("good", ["--num_prune", "4"], "--num_prune 4: must be between 1 and 3 for the 4-layer"),
        ("good", ["--num_prune", "0"], "--num_prune 0: must be between 1 and 3"),
        (
            "good",
            ["--mode", "exhaustive", "--max_exhaustive", "5"],
            r"--search_mode exhaustive: .*C\(4, 2\) = 6 proposals exceeds max_exhaustive=5",
        ),
    ],
)
def test_cli_rejects_bad_input(matrix_file, tmp_path, matrix, options, message):
    paths = write_bad_inputs(tmp_path) | {"good": matrix_file, "missing": tmp_path / "missing.npy"}
    output = tmp_path / "proposals.json"
    output.write_text("old\n")
    before = sorted(tmp_path.iterdir())
    argv = ["--matrix", str(paths[matrix]), "--num_prune", "2", "--output", str(output), *options]
    with pytest.raises(InputError, match=message):
        coarse_cli(argv)
    assert output.read_text() == "old\n"
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--beam_size", "0"], "argument --beam_size: must be >= 1, got 0"),
        (["--top_k", "-3"], "argument --top_k: must be >= 1, got -3"),
        (["--top_k", "x"], "argument --top_k: expected an integer, got 'x'"),
        (["--max_exhaustive", "0"], "argument --max_exhaustive: must be >= 1"),
        (["--mode", "random"], "argument --search_mode/--mode: invalid choice: 'random'"),
    ],
)
def test_cli_rejects_bad_options(matrix_file, tmp_path, capsys, options, message):
    argv = ["--matrix", str(matrix_file), "--num_prune", "2", "--output", "x.json", *options]
    with pytest.raises(SystemExit) as exit_info:
        coarse_cli(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_reproduces_reference(reference, tmp_path):
    output = tmp_path / "proposals.json"
    matrix = reference / "dc_mean_bs32_iter10.npy"
    coarse_cli(["--matrix", str(matrix), "--num_prune", "6", "--output", str(output)])
    expected = json.loads((reference / "expected_dc_bs32_prune6_top10.json").read_text())
    written = json.loads(output.read_text())
    assert [p["blocks"] for p in written] == [e["blocks"] for e in expected["proposals"]]
    assert [np.float32(p["score"]) for p in written] == [
        np.float32(e["score"]) for e in expected["proposals"]
    ]


def test_script_fails_with_one_error_line(matrix_file, tmp_path):
    output = tmp_path / "proposals.json"
    output.write_text("old\n")
    command = [sys.executable, str(SCRIPT), "--matrix", str(matrix_file), "--output", str(output)]
    failed = subprocess.run([*command, "--num_prune", "9"], capture_output=True, text=True)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--num_prune 9: must be between 1 and 3" in errors[0]
    assert "Traceback" not in failed.stderr
    assert output.read_text() == "old\n"
