"""L0 structured pruning: gates, masks, expected size, physical pruning, the stage-9 trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import copy_assets, load_checkpoint, load_model, save_model
from comflp.asr.config import ExperimentConfig, ModelConfig, load_config
from comflp.asr.data import load_eval_batches
from comflp.asr.model import ASRModel
from comflp.decoding import decode_set
from comflp.structured.gates import HardConcrete
from comflp.structured.lagrangian import Lagrangian, target_at
from comflp.structured.layout import GROUPS, gate_name
from comflp.structured.masked import GateSet, Masker
from comflp.structured.params import (
    encoder_layer_parameters,
    expected_parameters,
    prunable_parameters,
)
from comflp.structured.physical import physically_prune
from comflp.structured.plan import kept_parameters, meet_budget, module_plans
from tests.conftest import PYTHON, REPO, independent_cer, run_cmd

ENCODERS = ("transformer", "conformer")


def _model(encoder_type: str, num_heads: int = 4, ffn_dim: int = 48) -> ASRModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        input_dim=20,
        vocab_size=11,
        d_model=32,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        num_layers=4,
        dropout=0.0,
        subsampling_channels=8,
        interctc_layers=[],
        stochastic_depth_rate=0.2,
        encoder_type=encoder_type,
        conv_kernel=5,
    )
    model = ASRModel(cfg).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _groups(encoder_type: str) -> list[str]:
    return [g for g in GROUPS if encoder_type == "conformer" or g != "channels"]


FEATS = torch.randn(3, 70, 20, generator=torch.Generator().manual_seed(1))
LENS = torch.tensor([70, 52, 33])


def _random_gates(model: ASRModel, seed: int) -> GateSet:
    """Gates with a mix of kept, soft and removed entries, one layer and one module off."""
    gates = GateSet(model.cfg, _groups(model.cfg.encoder_type), 3.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.copy_(torch.rand(gate.log_alpha.shape, generator=g) * 6 - 3)
        for k in (1, 3, 4):
            gates.gates[gate_name(k)].log_alpha.fill_(10)
            for module in ("ff", "ff1", "conv"):
                if gate_name(k, module, "module") in gates.gates:
                    gates.gates[gate_name(k, module, "module")].log_alpha.fill_(10)
        gates.gates[gate_name(2)].log_alpha.fill_(-10)  # layer 2 removed
        gates.gates[gate_name(3, "attn", "module")].log_alpha.fill_(-10)  # attention of 3 gone
    return gates


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_all_gates_open_equal_the_unmasked_model(encoder_type):
    model = _model(encoder_type)
    with torch.no_grad():
        ref = model.encoder(FEATS, LENS)[0]
        with Masker(model, GateSet(model.cfg, _groups(encoder_type), 10.0)):
            out = model.encoder(FEATS, LENS)[0]
        after = model.encoder(FEATS, LENS)[0]  # hooks removed: the model is unchanged
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(after, ref)


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_physically_pruned_equals_masked_in_eval(encoder_type):
    model = _model(encoder_type)
    gates = _random_gates(model, seed=2)
    with torch.no_grad(), Masker(model, gates):
        masked = model.encoder(FEATS, LENS)[0]
    pruned = physically_prune(model, gates)
    with torch.no_grad():
        out, out_lens, _ = pruned.encoder(FEATS, LENS)
    assert pruned.cfg.num_layers == 3 and pruned.cfg.kept_layers == [1, 3, 4]
    assert pruned.cfg.layer_shapes[1]["heads"] == 0  # old layer 3 lost its attention
    assert pruned.encoder.layers[1].attn is None
    assert encoder_layer_parameters(pruned) < encoder_layer_parameters(model)
    assert torch.allclose(out, masked, atol=1e-5), (out - masked).abs().max()


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_expected_parameters_match_the_pruned_count(encoder_type):
    model = _model(encoder_type)
    assert prunable_parameters(model.cfg) == encoder_layer_parameters(model)
    for seed in range(3):
        gates = _random_gates(model, seed)
        hard = {k: (v > 0).double() for k, v in gates.values(training=False).items()}
        expected = float(expected_parameters(model.cfg, hard))
        actual = encoder_layer_parameters(physically_prune(model, gates))
        assert abs(expected - actual) <= 0.01 * actual, (expected, actual)


def test_expected_parameters_are_differentiable_and_monotone():
    model = _model("conformer")
    gates = GateSet(model.cfg, _groups("conformer"), 0.0)
    remaining = expected_parameters(model.cfg, gates.probabilities())
    remaining.backward()
    grads = [g.log_alpha.grad for g in gates.gates.values()]
    assert all(g is not None and bool((g > 0).all()) for g in grads)  # opening adds parameters
    # the expectation over independent gates: the mean count of sampled hard masks
    probs = {k: v.detach().double() for k, v in gates.probabilities().items()}
    generator = torch.Generator().manual_seed(0)
    counts = [
        float(
            expected_parameters(
                model.cfg, {k: torch.bernoulli(v, generator=generator) for k, v in probs.items()}
            )
        )
        for _ in range(2000)
    ]
    standard_error = np.std(counts) / np.sqrt(len(counts))
    assert abs(float(remaining.detach()) - np.mean(counts)) < 4 * standard_error
    assert float(remaining.detach()) < 0.9 * prunable_parameters(model.cfg)


def test_hard_concrete_probability_matches_its_samples():
    gate = HardConcrete(4, 0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
        samples = torch.stack([gate.sample() for _ in range(20000)])
        p = gate.prob_nonzero()
    assert ((samples >= 0) & (samples <= 1)).all()
    assert torch.allclose((samples > 0).float().mean(0), p, atol=0.015)
    assert bool(((samples == 0).float().mean(0) > 0).all())  # exact zeros occur


def test_masks_are_sampled_in_training_and_fixed_in_eval():
    model = _model("conformer")
    gates = GateSet(model.cfg, _groups("conformer"), 0.5)
    with Masker(model, gates) as masker:
        model.train()
        model.encoder(FEATS, LENS)
        first = {k: v.clone() for k, v in masker.values.items()}
        model.encoder(FEATS, LENS)
        assert any(not torch.equal(first[k], masker.values[k]) for k in first)
        model.eval()
        with torch.no_grad():
            a = model.encoder(FEATS, LENS)[0]
            b = model.encoder(FEATS, LENS)[0]
    assert torch.equal(a, b)


def test_lagrangian_and_target_ramp():
    assert [target_at(s, 10, 0.5) for s in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    assert target_at(3, 0, 0.5) == 0.5
    lag = Lagrangian()
    with torch.no_grad():
        lag.lambda1.fill_(2.0)
        lag.lambda2.fill_(3.0)
    assert float(lag(torch.tensor(0.3), 0.5)) == pytest.approx(2 * -0.2 + 3 * 0.04)


# ---- stage 9 on the tiny pipeline ----

SP_OPTIONS = [
    "--set",
    "structured.gate_lr=0.3",
    "--set",
    "structured.lambda_lr=1.0",
    "--set",
    "structured.warmup_fraction=0.3",
    "--set",
    "train.num_epochs=6",
    "--set",
    "train.max_duration=20",
    "--set",
    "train.num_workers=0",
]


def _prune(pipeline, tiny_data, exp_dir, *extra, check=True, options=SP_OPTIONS):
    return run_cmd(
        [
            PYTHON,
            REPO / "bin/structured_prune.py",
            "--sp_config",
            REPO / "conf/structured.yaml",
            "--model_dir",
            pipeline["exp_dir"],
            "--exp_dir",
            exp_dir,
            "--train_cuts",
            tiny_data["train"],
            "--dev_cuts",
            tiny_data["dev"],
            *options,
            *extra,
        ],
        check=check,
    )


def _error_line(proc) -> str:
    assert proc.returncode not in (0, 3), proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pruned_tiny(pipeline, tmp_path_factory):
    """Stage 9 on the tiny baseline: uninterrupted, and stopped twice then resumed."""
    from _pytest.monkeypatch import MonkeyPatch

    root = tmp_path_factory.mktemp("structured")
    mp = MonkeyPatch()
    mp.chdir(pipeline["workdir"])
    w = pipeline["workdir"]
    data = {
        "train": w / "data/fbank/cuts_train-clean-100.jsonl.gz",
        "dev": w / "data/fbank/cuts_dev-clean.jsonl.gz",
    }
    _prune(pipeline, data, root / "straight")
    assert (
        _prune(pipeline, data, root / "resumed", "--stop_after_steps", "3", check=False).returncode
        == 3
    )
    assert (
        _prune(pipeline, data, root / "resumed", "--stop_after_steps", "7", check=False).returncode
        == 3
    )
    _prune(pipeline, data, root / "resumed")
    yield {"root": root, "data": data}
    mp.undo()


def pruned_dir(root) -> object:
    return root / "structured/sparsity0.5"


def test_sparsity_reaches_the_target(pruned_tiny, pipeline):
    sp_dir = pruned_dir(pruned_tiny["root"] / "straight")
    structure = json.loads((sp_dir / "structure.json").read_text())
    assert structure["target_sparsity"] == 0.5
    assert abs(structure["sparsity"] - 0.5) <= 0.01, structure
    model = load_model(sp_dir)  # a normal experiment directory
    baseline = load_model(pipeline["exp_dir"])
    kept = encoder_layer_parameters(model)
    assert kept == structure["encoder_layer_parameters"]
    assert kept == pytest.approx(0.5 * encoder_layer_parameters(baseline), rel=0.04)
    dev = json.loads((sp_dir / "final_dev.json").read_text())
    native = NativeModel.load(sp_dir)
    decoded = decode_set(native, load_eval_batches(native, pruned_tiny["data"]["dev"], 30))
    assert dev["cer"] == pytest.approx(independent_cer(decoded.utts))
    history = json.loads((sp_dir / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[-1]["train_target_sparsity"] == pytest.approx(0.5)


def test_resume_gives_the_same_pruned_model(pruned_tiny):
    straight = load_checkpoint(pruned_dir(pruned_tiny["root"] / "straight") / "model.pt")
    resumed = load_checkpoint(pruned_dir(pruned_tiny["root"] / "resumed") / "model.pt")
    assert straight["model"].keys() == resumed["model"].keys()
    for k in straight["model"]:
        assert torch.allclose(straight["model"][k], resumed["model"][k], atol=1e-6), k
    for name in ("structure.json", "config.yaml"):
        a = (pruned_dir(pruned_tiny["root"] / "straight") / name).read_text()
        assert a == (pruned_dir(pruned_tiny["root"] / "resumed") / name).read_text()


def test_pruned_model_fine_tunes_like_any_model(pruned_tiny, tmp_path):
    """Stage 8 starts from the pruned model's own weights: with a learning rate too small to
    move them, the fine-tuned model is the pruned one."""
    source = pruned_dir(pruned_tiny["root"] / "straight")
    run_cmd(
        [
            PYTHON,
            REPO / "bin/train.py",
            "--train_config",
            REPO / "conf/train_tiny.yaml",
            "--init_model",
            source,
            "--exp_dir",
            tmp_path / "ft",
            "--train_cuts",
            pruned_tiny["data"]["train"],
            "--dev_cuts",
            pruned_tiny["data"]["dev"],
            *(
                "--set",
                "train.num_epochs=1",
                "--set",
                "train.lr=1e-12",
                "--set",
                "train.min_lr=1e-13",
            ),
        ]
    )
    model, straight = load_model(tmp_path / "ft"), load_model(source)
    assert model.cfg.layer_shapes == straight.cfg.layer_shapes
    tuned, pruned = model.state_dict(), straight.state_dict()
    assert tuned.keys() == pruned.keys()
    for name, value in tuned.items():
        torch.testing.assert_close(value, pruned[name], rtol=0, atol=1e-6, msg=name)


def test_bad_structured_inputs(pipeline, tiny_data, tmp_path):
    line = _error_line(
        _prune(pipeline, tiny_data, tmp_path / "a", "--sp_target_sparsity", "1.2", check=False)
    )
    assert "target_sparsity" in line and "(0, 1)" in line
    proc = _prune(
        pipeline, tiny_data, tmp_path / "b", "--set", "structured.gates=[channels]", check=False
    )
    assert "channels" in _error_line(proc) and "transformer" in _error_line(proc)
    # A teacher of another shape.
    cfg = load_config(REPO / "conf/train_tiny.yaml", {"model.d_model": 48})
    cfg.model.vocab_size = load_model(pipeline["exp_dir"]).cfg.vocab_size
    other = tmp_path / "other"
    save_model(ASRModel(cfg.model), ExperimentConfig(model=cfg.model, train=cfg.train), other)
    copy_assets(pipeline["exp_dir"], pipeline["exp_dir"] / "cmvn.json", other)
    proc = _prune(pipeline, tiny_data, tmp_path / "c", "--teacher", other, check=False)
    assert "teacher" in _error_line(proc) and "shape" in _error_line(proc)
    # Resume with another sparsity config: refused, nothing written is changed.
    sp_dir = tmp_path / "d"
    assert (
        _prune(pipeline, tiny_data, sp_dir, "--stop_after_steps", "1", check=False).returncode == 3
    )
    out = sp_dir / "structured/sparsity0.5"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = _prune(pipeline, tiny_data, sp_dir, "--set", "structured.lambda_lr=2.0", check=False)
    assert "lambda_lr" in _error_line(proc) and "another structured config" in _error_line(proc)
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("encoder_type", ENCODERS)
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_the_pruned_model_meets_the_budget_whatever_the_gates(encoder_type, target):
    """Gates far from the target (random log_alpha): the deterministic structure is moved to
    within 1 point of the sparsity asked for, and the pruned model computes what the gates with
    those values compute. Entries as fine-grained as a real model's (each well under 1% of the
    prunable parameters)."""
    model = _model(encoder_type, num_heads=8, ffn_dim=256)
    gates = _random_gates(model, seed=5)
    total = prunable_parameters(model.cfg)
    before = 1 - kept_parameters(gates, gates.values(training=False)) / total
    values = meet_budget(gates, target)
    pruned = physically_prune(model, gates, target)
    reached = 1 - encoder_layer_parameters(pruned) / total
    assert reached == pytest.approx(1 - kept_parameters(gates, values) / total, abs=1e-9)
    assert abs(reached - target) <= 0.01, (before, reached)
    assert abs(before - target) > 0.01 or target == 0.5  # the gates alone missed most targets
    plans, removed = module_plans(gates, values)
    assert pruned.cfg.num_layers == model.cfg.num_layers - len(removed)
