"""Adding a score is one class and its registration: a score defined here, with an option of its
own, registered for the test only, goes through stage 5 (built from a dump with its option set by
``--score_conf``, written, drawn) and stage 6 (CoMFLP ranks by it) with nothing else changed
(docs/DESIGN.md, "How to add"); ``--score_conf`` mistakes are one line naming what was expected."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from comflp.errors import InputError
from comflp.expdir import ExpDir
from comflp.prune.dump import dump_layers
from comflp.prune.scores.base import SCORES, ProposalScore, score_options
from comflp.prune.searches import SEARCHES, SearchContext, SearchSettings
from comflp.settings import option
from comflp.stages.scores import ScoreSettings, build_scores

from .conftest import PYTHON, REPO, run_cmd
from .test_searches import KnownStack, additive_cer


@dataclass(kw_only=True)
class UpdateNormOptions:
    scale: float = option(1.0, "multiplies every norm", low=0)


class UpdateNorm(ProposalScore):
    """Minus the summed mean size of the pruned layers' updates: small updates go first."""

    name = "update_norm"
    file_name = "norms.json"
    Options = UpdateNormOptions

    def __init__(self, norms: list[float]):
        self.norms = np.asarray(norms, dtype=np.float64)

    @classmethod
    def build(cls, layer_feats, options: UpdateNormOptions) -> UpdateNorm:
        steps = zip(layer_feats[:-1], layer_feats[1:], strict=True)
        return cls([options.scale * float(np.linalg.norm(b - a, axis=1).mean()) for a, b in steps])

    @classmethod
    def read(cls, path: Path) -> UpdateNorm:
        return cls(json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.norms.tolist()))

    @property
    def num_layers(self) -> int:
        return len(self.norms)

    def scorer(self, aggregation: str = "mean") -> UpdateNorm:
        return self

    def scores(self, combos: np.ndarray) -> np.ndarray:
        return -self.norms[np.asarray(combos) - 1].sum(axis=1)

    def heatmap(self, path: Path, title: str) -> None:
        from comflp.plots import plot_matrix

        plot_matrix(np.diag(self.norms), path, title, pairs=True)


class StatesOnly:
    """A stack whose layer states are given: layer k adds an update of size ``sizes[k - 1]``."""

    name = "encoder"

    def __init__(self, sizes: list[float]):
        self.num_layers = len(sizes)
        self.sizes = sizes
        self.model = type("M", (), {"module": torch.nn.Identity()})()

    def states(self, batch):
        x = torch.ones(1, 5, 3)
        states = [x]
        for size in self.sizes:
            states.append(states[-1] + size * torch.tensor([1.0, 0.0, 0.0]))
        return states, torch.tensor([5])


@pytest.fixture
def registered(monkeypatch):
    SCORES.names()  # discover the package's own scores first
    monkeypatch.setitem(SCORES._entries, UpdateNorm.name, UpdateNorm)


def test_a_new_score_goes_through_stages_5_and_6(registered, tmp_path):
    exp = ExpDir(tmp_path / "exp")
    sizes = [9.0, 1.0, 4.0, 2.0, 7.0, 3.0]  # the same order as additive_cer's costs
    dump_layers(StatesOnly(sizes), [{"ids": ["u1"]}], exp.dump, pooling="frames")
    conf = ["update_norm.scale=2"]
    build_scores(ScoreSettings(exp_dir=exp.root, scores=["update_norm"], score_conf=conf))
    stored = json.loads((exp.score("update_norm") / "norms.json").read_text())
    assert stored == pytest.approx([2 * s for s in sizes])
    recorded = json.loads((exp.score("update_norm") / "settings.json").read_text())
    assert recorded["options"] == {"scale": 2.0}
    assert (exp.score("update_norm") / "heatmap.png").stat().st_size > 0
    settings = SearchSettings(exp_dir=exp.root, scores=["update_norm"], top_k=3)
    context = SearchContext(settings, KnownStack(additive_cer), [], exp)
    (result,) = SEARCHES["comflp"]().run(context, [2]).values()
    # summed sizes 3, 4, then a tie at 5 that keeps the beam's generation order: (2, 3) first;
    # then the top-P proposal (--fine_rules drop_top)
    assert [r["layers"] for r in result.candidates] == [[2, 4], [2, 6], [2, 3], [5, 6]]
    assert result.best_layers == (2, 4)  # the two smallest updates, and the lowest CER


def test_the_consensus_is_composed_of_the_other_scores(tmp_path):
    exp = ExpDir(tmp_path / "exp")
    sizes = [9.0, 1.0, 4.0, 2.0, 7.0, 3.0]
    dump_layers(StatesOnly(sizes), [{"ids": ["u1"]}], exp.dump, pooling="frames")
    build_scores(ScoreSettings(exp_dir=exp.root, scores=["residual_sum", "cosine", "consensus"]))
    stored = json.loads((exp.score("consensus") / "members.json").read_text())
    assert stored == {"members": ["residual_sum", "cosine"], "num_layers": 6}
    assert (exp.score("consensus") / "heatmap.png").stat().st_size > 0
    with pytest.raises(InputError, match="consensus needs 2 or more other scores, got 1"):
        build_scores(ScoreSettings(exp_dir=exp.root, scores=["cosine", "consensus"]))
    # stage 6 binds it to its members' scores: they must be among --scores there too
    settings = SearchSettings(exp_dir=exp.root, scores=["cosine", "consensus"], top_k=3)
    context = SearchContext(settings, KnownStack(additive_cer), [], exp)
    with pytest.raises(InputError, match="consensus of residual_sum cosine: residual_sum not"):
        SEARCHES["comflp"]().run(context, [2])


def test_each_score_takes_its_own_options_with_its_defaults():
    options = score_options(["dc", "pwcca", "svcca", "cka", "residual_sum"], ["dc.batch_size=8"])
    assert options["dc"].batch_size == 8
    assert options["pwcca"].threshold == options["svcca"].threshold == 0.99
    assert not vars(options["cka"]) and not vars(options["residual_sum"])
    assert score_options(["dc"], [])["dc"].batch_size == 32  # CoMFLP's batched dc
    # a matrix score's options are its measure's, so the two cannot drift apart
    from comflp.prune.correlation import MEASURES

    for name, measure in MEASURES.items():
        assert set(vars(SCORES[name].Options())) == set(measure.options)


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        (["dc=8"], "--score_conf dc=8: expected SCORE.OPTION=VALUE, e.g. dc.batch_size=8"),
        (["cka.batch_size=8"], "'cka' is not one of --scores (dc)"),
        (["dc.threshold=0.9"], "score dc takes the options batch_size=32"),
        (
            ["dc.batch_size=many"],
            "--score_conf dc.batch_size=many: expected an integer, got 'many'",
        ),
        (["dc.batch_size=-1"], "must be >= 0"),
    ],
)
def test_score_conf_mistakes_are_one_line(conf: list[str], expected: str):
    with pytest.raises(InputError) as e:
        score_options(["dc"], conf)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_dump_is_one_line_that_says_to_rerun_stage_4(tmp_path):
    exp = ExpDir(tmp_path / "exp")
    dump_layers(StatesOnly([1.0, 2.0, 3.0]), [{"ids": ["u1"]}, {"ids": ["u2"]}], exp.dump, "frames")
    ark = exp.dump / "layer02.ark"
    ark.write_bytes(ark.read_bytes()[: ark.stat().st_size // 2])  # cut short
    proc = run_cmd(
        [PYTHON, REPO / "bin/scores.py", "--exp_dir", exp.root, "--scores", "dc"], check=False
    )
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "layer02.scp: cannot read layer 2 of the dump" in errors[0]
    assert errors[0].endswith("rerun stage 4")
    assert not exp.score("dc").exists()
