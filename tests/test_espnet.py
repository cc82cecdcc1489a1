"""The ESPnet2 adapter: tiny ESPnet models built from configs by ESPnet's own task builder (no
download), checked against ESPnet's own encoder, ``Speech2Text`` and token list.

Run inside ESPnet's environment: ``.venv-espnet/bin/python -m pytest -m espnet``.
"""

import contextlib
import copy
import itertools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

espnet_asr = pytest.importorskip("espnet2.tasks.asr")

from espnet2.bin.asr_inference import Speech2Text  # noqa: E402

from comflp import expdir  # noqa: E402
from comflp.adapters import load_prunable  # noqa: E402
from comflp.adapters.espnet import EspnetModel  # noqa: E402
from comflp.asr.config import ConfigError  # noqa: E402
from comflp.asr.data import eval_loader, load_cuts, load_eval_batches  # noqa: E402
from comflp.prune.dump import dump_layers, load_layer_feats  # noqa: E402
from comflp.prune.stacks import EncoderStack  # noqa: E402

from .conftest import ONE_LAYER_SEARCH, PYTHON, REPO, run_cmd, run_sh  # noqa: E402

pytestmark = pytest.mark.espnet
ASRTask = espnet_asr.ASRTask

BLOCK = dict(output_size=32, attention_heads=2, linear_units=64, num_blocks=4, input_layer="conv2d")
REL_POS = dict(rel_pos_type="latest", pos_enc_layer_type="rel_pos")
# kind -> (encoder, encoder_conf, attention decoder, token type)
KINDS = {
    "transformer": ("transformer", {}, True, "bpe"),
    "transformer_selfcond": (
        "transformer",
        {"interctc_layer_idx": [2], "interctc_use_conditioning": True},
        False,
        "char",
    ),
    "conformer_selfcond": (
        "conformer",
        {
            **REL_POS,
            "selfattention_layer_type": "rel_selfattn",
            "macaron_style": True,
            "cnn_module_kernel": 7,
            "stochastic_depth_rate": [0.0, 0.1, 0.1, 0.2],
            "interctc_layer_idx": [1, 2],
            "interctc_use_conditioning": True,
        },
        True,
        "bpe",
    ),
    "conformer_interctc": (
        "conformer",
        {**REL_POS, "selfattention_layer_type": "rel_selfattn", "interctc_layer_idx": [2]},
        False,
        "char",
    ),
    "e_branchformer_selfcond": (
        "e_branchformer",
        {
            **REL_POS,
            "attention_layer_type": "rel_selfattn",
            "cgmlp_linear_units": 64,
            "cgmlp_conv_kernel": 7,
            "interctc_layer_idx": [2],
            "interctc_use_conditioning": True,
        },
        True,
        "char",
    ),
}
CHARS = ["<space>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]
# Where the configs name their files: relative to the model directory, and one absolute path
# that does not exist (found by name in the model directory).
FILES = {
    "token_list": "tokens.txt",
    "bpemodel": "/nonexistent/bpe.model",
    "stats_file": "exp/stats/feats_stats.npz",
}


def _token_list(token_type: str, lang_dir: Path) -> list[str]:
    if token_type == "char":
        return ["<blank>", "<unk>", *CHARS, "<sos/eos>"]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(lang_dir / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    return ["<blank>", "<unk>", *[p for p in pieces if not p.startswith("<")], "<sos/eos>"]


def _config(kind: str) -> dict:
    """A full training config, as asr_train writes it (ESPnet's own defaults), for ``kind``."""
    encoder, conf, decoder, token_type = KINDS[kind]
    config = vars(ASRTask.get_parser().parse_args(["--output_dir", "unused"]))
    config.update(
        encoder=encoder,
        encoder_conf={**BLOCK, **conf},
        decoder="transformer" if decoder else None,
        decoder_conf={"attention_heads": 2, "linear_units": 64, "num_blocks": 1} if decoder else {},
        model_conf={
            "ctc_weight": 0.3 if decoder else 1.0,
            "interctc_weight": 0.3 if conf.get("interctc_layer_idx") else 0.0,
        },
        frontend="default",
        frontend_conf={"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160},
        normalize="global_mvn",
        normalize_conf={"stats_file": FILES["stats_file"]},
        specaug=None,
        token_type=token_type,
        token_list=FILES["token_list"],
        bpemodel=FILES["bpemodel"] if token_type == "bpe" else None,
    )
    return config


def build(directory: Path, kind: str, lang_dir: Path, seed: int = 0) -> Path:
    """A random tiny ESPnet model of ``kind`` built by ASRTask.build_model, saved with its
    config (file paths as in :data:`FILES`), token list, BPE model and statistics."""
    directory.mkdir(parents=True)
    config = _config(kind)
    tokens = _token_list(config["token_type"], lang_dir)
    (directory / "tokens.txt").write_text("".join(t + "\n" for t in tokens))
    if config["token_type"] == "bpe":
        (directory / "bpe.model").write_bytes((lang_dir / "tokenizer.model").read_bytes())
    rng = np.random.default_rng(seed)
    mean, var = -6 + rng.standard_normal(80), 2 + rng.random(80)
    stats = directory / FILES["stats_file"]
    stats.parent.mkdir(parents=True)
    np.savez(stats, count=np.array(1000), sum=1000 * mean, sum_square=1000 * (var + mean**2))
    args = copy.deepcopy(config)
    args.update(token_list=str(directory / "tokens.txt"), normalize_conf={"stats_file": str(stats)})
    torch.manual_seed(seed)
    model = ASRTask.build_model(__import__("argparse").Namespace(**args))
    with torch.no_grad():  # LayerNorms away from identity, so that a missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    torch.save(model.state_dict(), directory / "valid.acc.ave.pth")
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, pipeline) -> dict:
    root = tmp_path_factory.mktemp("espnet_models")
    lang_dir = pipeline["workdir"] / "data/lang_bpe48"
    return {kind: build(root / kind, kind, lang_dir) for kind in KINDS}


def _reference_model(model_dir: Path):
    """ESPnet's own model of ``model_dir`` (build_model_from_file, from inside the directory
    so that its relative paths resolve), in eval mode."""
    with contextlib.chdir(model_dir):
        asr, _ = ASRTask.build_model_from_file("config.yaml", "valid.acc.ave.pth", "cpu")
    return asr.eval()


def _hooked_encode(asr, batch: dict, layers: list[int]) -> tuple[dict, torch.Tensor]:
    """ESPnet's ``encode`` with the input of block 1 (index 0) and the outputs of ``layers``
    captured; the encoder's output lengths."""
    seen = {}

    def keep(index):
        def hook(module, args, output=None):
            x = args[0] if output is None else output[0]
            seen[index] = (x[0] if isinstance(x, tuple) else x).detach()

        return hook

    blocks = asr.encoder.encoders
    handles = [blocks[0].register_forward_pre_hook(keep(0))]
    handles += [blocks[k - 1].register_forward_hook(keep(k)) for k in layers]
    with torch.no_grad():
        _, lengths = asr.encode(batch["speech"], batch["speech_lengths"])
    for h in handles:
        h.remove()
    return seen, lengths


@pytest.mark.parametrize("kind", list(KINDS))
def test_dump_index_0_and_L_are_espnets_own_tensors(kind, models, tiny_data, tmp_path):
    model = EspnetModel.load(models[kind])
    batches = load_eval_batches(model, tiny_data["dev"], max_duration=12)
    info = dump_layers(EncoderStack(model), batches, tmp_path / "dump", pooling="mean")
    assert info["num_layers"] == 4 and info["d_model"] == 32 and info["num_utts"] == 8
    feats = load_layer_feats(tmp_path / "dump")
    asr = _reference_model(models[kind])
    # index k of an intermediate-CTC layer is the block's own output (before conditioning)
    indices = sorted({0, 4, *model.interctc_layers})
    row = 0
    for batch in batches:
        seen, lengths = _hooked_encode(asr, batch, [k for k in indices if k])
        for i, n in enumerate(lengths.tolist()):
            for k in indices:
                pooled = seen[k][i, :n].mean(0).numpy()
                assert np.allclose(feats[k][row + i], pooled, atol=1e-5), (k, i)
        row += len(batch["ids"])
    assert row == 8


def _subset_log_probs(model: EspnetModel, batch: dict, kept: tuple[int, ...]):
    """comflp's log-probabilities of a layer subset, all at once and one layer per call (as
    the prefix-sharing evaluator runs them): both must agree."""
    with torch.no_grad():
        h0 = model.embed(batch)
        log_probs, lengths = model.readout(model.forward_layers(h0, kept))
        h = h0
        for k in kept:
            h = model.forward_layers(h, [k])
        stepwise, _ = model.readout(h)
    assert torch.equal(log_probs, stepwise)
    return log_probs, lengths


def _valid_max_diff(a, b, lengths) -> float:
    return max(float((a[i, :n] - b[i, :n]).abs().max()) for i, n in enumerate(lengths.tolist()))


PRUNINGS = [[1, 3], [2], [3, 4]]  # keeps an interCTC layer / drops it / ends on it


@pytest.mark.parametrize("kind", list(KINDS))
def test_pruned_model_reloaded_by_speech2text_gives_comflps_log_probs(
    kind, models, tiny_data, tmp_path
):
    model = EspnetModel.load(models[kind])
    batch = load_eval_batches(model, tiny_data["dev"], max_duration=12)[0]
    for pruned in PRUNINGS:
        kept = tuple(k for k in range(1, 5) if k not in pruned)
        out = tmp_path / "_".join(map(str, pruned))
        model.prune(pruned).save(out, {"pruned_layers": pruned})
        assert json.loads((out / expdir.PRUNE_INFO).read_text())["pruned_layers"] == pruned
        config = yaml.safe_load((out / "config.yaml").read_text())
        conf = config["encoder_conf"]
        renumber = {k: i for i, k in enumerate(kept, 1)}
        assert conf["num_blocks"] == len(kept)
        assert conf["interctc_layer_idx"] == [
            renumber[k] for k in model.interctc_layers if k in kept and k != kept[-1]
        ]
        if kind == "conformer_selfcond":
            rates = [0.0, 0.1, 0.1, 0.2]
            assert conf["stochastic_depth_rate"] == [rates[k - 1] for k in kept]
        s2t = Speech2Text(out / "config.yaml", out / "model.pth", device="cpu")
        asr = s2t.asr_model
        state = torch.load(out / "model.pth", weights_only=True)
        assert set(state) == set(asr.state_dict())  # Speech2Text itself loads with strict=False
        # (Speech2Text casts the model to float32, the float64 normalisation statistics too)
        assert all(torch.equal(state[k].to(v.dtype), v) for k, v in asr.state_dict().items())
        with torch.no_grad():
            enc, lengths = asr.encode(batch["speech"], batch["speech_lengths"])
            enc = enc[0] if isinstance(enc, tuple) else enc
            reference = asr.ctc.log_softmax(enc)
        log_probs, ours = _subset_log_probs(model, batch, kept)
        assert torch.equal(ours, lengths) and log_probs.shape == reference.shape
        assert _valid_max_diff(log_probs, reference, lengths) < 1e-5, (kind, pruned)
        again = EspnetModel.load(out)
        assert again.num_layers == len(kept) and again.interctc_layers == tuple(
            conf["interctc_layer_idx"]
        )


@pytest.mark.parametrize("kind", ["transformer", "transformer_selfcond", "conformer_selfcond"])
def test_greedy_text_and_beam_search_are_espnets(kind, models, tiny_data, tmp_path):
    model = EspnetModel.load(models[kind])
    # the manifest's first batch: its transcripts are all in the tiny models' token list
    cuts = load_cuts(tiny_data["dev"])
    batch = next(iter(eval_loader(cuts, model.dataset(), max_duration=12)))
    model.save(tmp_path / "full")
    # CTC only without a decoder (ESPnet's beam search needs ctc_weight 1.0 then)
    ctc_weight = 0.3 if model.asr.decoder is not None else 1.0
    s2t = Speech2Text(
        tmp_path / "full/config.yaml",
        tmp_path / "full/model.pth",
        beam_size=3,
        ctc_weight=ctc_weight,
    )
    asr = s2t.asr_model
    with torch.no_grad():
        enc, lengths = asr.encode(batch["speech"], batch["speech_lengths"])
        enc = enc[0] if isinstance(enc, tuple) else enc
        best = asr.ctc.argmax(enc)
    exclude = {asr.blank_id, asr.sos, asr.eos}
    theirs = []
    for i, n in enumerate(lengths.tolist()):
        ids = [int(t) for t, _ in itertools.groupby(best[i, :n].tolist()) if t not in exclude]
        theirs.append(s2t.tokenizer.tokens2text(s2t.converter.ids2tokens(ids)))
    ours = [model.decode_ids(ids) for ids in model.decode(batch)]
    assert ours == theirs
    assert sum(len(t) for t in ours) > 0  # a random model emits tokens: not vacuous
    # references tokenised by ESPnet's preprocessor decode back to the (cased) transcripts
    for i, text in enumerate(batch["texts"]):
        assert model.decode_ids(batch["targets"][i, : batch["target_lens"][i]].tolist()) == text
    # ESPnet's joint CTC/attention beam search, through decode()
    beam = model.decode(batch, "espnet_beam_search", beam_size=3, ctc_weight=0.3)
    for i, n in enumerate(batch["speech_lengths"].tolist()[:2]):
        results = s2t(batch["speech"][i, :n])
        results = results[0] if isinstance(results, tuple) else results
        assert beam[i] == list(results[0][2])


def _write_bad_models(root: Path, good: Path) -> dict:
    """Directories that are not a prunable ESPnet model, with the error each must give."""
    (root / "empty").mkdir()
    config = yaml.safe_load((good / "config.yaml").read_text())
    variants = {
        "mismatch": ("encoder_conf", "num_blocks", 3),
        "rnn": (None, "encoder", "rnn"),
        "no_ctc": ("model_conf", "ctc_weight", 0.0),
    }
    for name, (section, key, value) in variants.items():
        (root / name).mkdir()
        for f in good.rglob("*"):
            if f.is_file() and f.name != "config.yaml":
                (root / name / f.relative_to(good)).parent.mkdir(parents=True, exist_ok=True)
                (root / name / f.relative_to(good)).write_bytes(f.read_bytes())
        changed = copy.deepcopy(config)
        (changed[section] if section else changed)[key] = value
        (root / name / "config.yaml").write_text(yaml.safe_dump(changed))
    return {
        "empty": "no config.yaml (expected an ESPnet2 ASR model directory",
        "mismatch": "valid.acc.ave.pth: does not match config.yaml (unexpected: "
        "encoder.encoders.3.",
        "rnn": "encoder 'rnn' is not supported; supported: transformer, conformer, e_branchformer",
        "no_ctc": "model_conf.ctc_weight is 0, so the model has no CTC head",
    }


def _one_error_line(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_bad_input_gives_one_clear_error_line(models, tiny_data, tmp_path):
    errors = _write_bad_models(tmp_path, models["transformer"])
    for name, message in errors.items():
        with pytest.raises(ConfigError, match="^" + str(tmp_path / name)) as e:
            load_prunable("espnet", tmp_path / name)
        assert message in str(e.value)
    exp = tmp_path / "exp"
    dump = [PYTHON, REPO / "bin/dump_layers.py", "--exp_dir", exp, "--model_type", "espnet"]
    commands = {
        name: [*dump, "--model_dir", tmp_path / name, "--cuts", tiny_data["dev"]] for name in errors
    }
    search = [PYTHON, REPO / "bin/search.py", "--exp_dir", exp, "--model_type", "espnet"]
    commands["num_prune"] = [
        *search,
        *("--model_dir", models["transformer"], "--dev_cuts", tiny_data["dev"]),
        *("--search_methods", "glp", "--num_prune", "4"),
    ]
    errors["num_prune"] = "--num_prune 4: must be between 1 and 3 for the 4-layer encoder"
    procs = {  # concurrently: each process spends seconds importing ESPnet
        name: subprocess.Popen(
            [str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        _one_error_line(
            subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), errors[name]
        )
    assert not exp.exists()


def test_run_sh_says_what_to_run_when_espnets_environment_cannot_be_made(models, tmp_path):
    env = {
        **os.environ,
        "COMFLP_ESPNET_VENV": str(tmp_path / "no-venv"),
        "COMFLP_PYTHON": str(tmp_path / "no-python3"),
    }
    workdir = tmp_path / "recipe"
    workdir.mkdir()
    proc = run_cmd(
        [REPO / "run.sh", "--stage", "4", "--stop_stage", "7", "--model_type", "espnet",
         "--model_dir", models["transformer"]],
        cwd=workdir, check=False, env=env,
    )  # fmt: skip
    _one_error_line(proc, f"run: {REPO}/utils/setup.sh --espnet")
    assert "could not set up ESPnet's environment .venv-espnet" in proc.stderr
    assert list(workdir.iterdir()) == [] and not (tmp_path / "no-venv").exists()


@pytest.mark.e2e
def test_stages_4_to_8_prune_and_finetune_an_espnet_model(pipeline, models, tmp_path):
    source = models["conformer_selfcond"]  # attention decoder, intermediate CTC, conditioning
    exp = pipeline["workdir"] / "exp/espnet"
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(
        "train: {num_epochs: 1, max_duration: 30, lr: 0.001, warmup_steps: 2, "
        "average_checkpoints: 1, num_workers: 0, seed: 1}\n"
    )
    run_sh(
        pipeline["workdir"],
        *("--stage", "4", "--stop_stage", "8", "--model_type", "espnet"),
        *(
            "--model_dir",
            str(source),
            "--exp_dir",
            "exp/espnet",
            "--finetune_config",
            str(finetune),
        ),
        *ONE_LAYER_SEARCH,
    )
    info = json.loads((exp / "dump/info.json").read_text())
    assert info["model_type"] == "espnet" and info["num_layers"] == 4 and info["num_utts"] == 16
    assert np.load(exp / "scores/dc/matrix.npy").shape == (5, 5)
    search = json.loads((exp / "search/comflp_prune1/search.json").read_text())
    pruned_dir = exp / "search/comflp_prune1/pruned"
    assert search["model_type"] == "espnet" and len(search["best_layers"]) == 1
    assert EspnetModel.load(pruned_dir).num_layers == 3
    Speech2Text(pruned_dir / "config.yaml", pruned_dir / "model.pth")  # ESPnet loads it
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    assert {r["num_prune"] for r in rows} == {0, 1}
    # stage 8: fine-tuned with ESPnet's own loss, so the attention decoder was trained too
    ft = exp / "finetune/comflp_prune1"
    assert EspnetModel.load(ft).num_layers == 3
    before = torch.load(exp / "search/comflp_prune1/pruned/model.pth", weights_only=True)
    after = torch.load(ft / "model.pth", weights_only=True)
    assert set(before) == set(after)
    for name in (
        "decoder.output_layer.weight",
        "ctc.ctc_lo.weight",
        "encoder.conditioning_layer.weight",
    ):
        assert not torch.equal(before[name], after[name]), name
    history = json.loads((ft / expdir.HISTORY).read_text())
    assert len(history) == 1 and "train_loss_att" in history[0]
    (row,) = [r for r in json.loads((exp / "compare/results.json").read_text())["rows"]
              if r["method"] == "comflp+finetune"]  # fmt: skip
    assert row["num_prune"] == 1
    assert "| comflp+finetune | 1 |" in (exp / "RESULTS.md").read_text()
