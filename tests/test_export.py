"""Export to ONNX and sherpa-onnx: the graph computes torch's log-probabilities, sherpa-onnx's
own recogniser decodes what comflp decodes, bad input fails cleanly and writes nothing.

sherpa-onnx 2.0.1 dithers the samples of its offline fbank (Gaussian noise of about one 16-bit
step, whatever ``FeatureExtractorConfig.dither`` says), so its features on the built-in corpus's
digital silences are random: exact transcripts are compared on the test utterances with a noise
floor far above the dither (``NOISE_FLOOR``), where its fbank is lhotse's; the clean test set's
CER is compared within 0.3 points (and on the full-size model in docs/results/deploy/).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from lhotse import CutSet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
sherpa_onnx = pytest.importorskip("sherpa_onnx")

from comflp.adapters.native import NativeModel  # noqa: E402
from comflp.asr.checkpoint import copy_assets, save_model  # noqa: E402
from comflp.asr.config import ExperimentConfig, load_config  # noqa: E402
from comflp.asr.ctc import ctc_greedy_search  # noqa: E402
from comflp.asr.data import load_cuts, load_eval_batches, pad_sequences  # noqa: E402
from comflp.asr.model import ASRModel  # noqa: E402
from comflp.asr.scoring import error_stats  # noqa: E402
from comflp.decoding import decode_set  # noqa: E402
from comflp.export import ExportError, export_model  # noqa: E402
from comflp.export import core as export_core  # noqa: E402
from comflp.export.runtime import OrtCtc, SherpaCtc, normalise, read_tokens  # noqa: E402
from comflp.structured.layout import gate_name  # noqa: E402
from comflp.structured.masked import GateSet  # noqa: E402
from comflp.structured.physical import physically_prune  # noqa: E402

from .conftest import PYTHON, REPO, run_cmd  # noqa: E402

MODELS = ("transformer", "conformer", "layer_pruned", "structured")
NOISE_FLOOR = 0.1  # std of the Gaussian noise added for exact sherpa-onnx comparisons


def _conformer(baseline: NativeModel) -> ASRModel:
    """A random Conformer of the tiny config, with BatchNorm statistics that do something."""
    cfg = load_config(REPO / "conf/train_tiny.yaml").model
    cfg.encoder_type, cfg.conv_kernel, cfg.vocab_size = "conformer", 5, baseline.asr.cfg.vocab_size
    torch.manual_seed(0)
    model = ASRModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _structured(model: ASRModel) -> ASRModel:
    """``model`` physically pruned by random gates: layer 2 removed, layer 3 without attention,
    some heads, units and channels cut, the rest scaled."""
    gates = GateSet(model.cfg, ("heads", "units", "channels", "modules", "layers"), 3.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.copy_(torch.rand(gate.log_alpha.shape, generator=g) * 6 - 2)
        for k in (1, 3, 4):
            gates.gates[gate_name(k)].log_alpha.fill_(10)
        gates.gates[gate_name(2)].log_alpha.fill_(-10)
        gates.gates[gate_name(3, "attn", "module")].log_alpha.fill_(-10)
    return physically_prune(model, gates)


@pytest.fixture(scope="module")
def model_dirs(pipeline, tmp_path_factory) -> dict:
    """The tiny trained baseline and the other three kinds of model, as model directories."""
    root = tmp_path_factory.mktemp("export_models")
    base = NativeModel.load(pipeline["exp_dir"])
    base.prune([2, 3]).save(root / "layer_pruned")
    conformer = _conformer(base)
    structured = _structured(conformer)
    assert structured.cfg.kept_layers == [1, 3, 4] and structured.cfg.layer_shapes[1]["heads"] == 0
    for name, asr in (("conformer", conformer), ("structured", structured)):
        copy_assets(pipeline["exp_dir"], pipeline["exp_dir"] / "cmvn.json", root / name)
        save_model(asr, ExperimentConfig(model=asr.cfg), root / name)
    return {"transformer": pipeline["exp_dir"], **{n: root / n for n in MODELS[1:]}}


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """name -> its export directory, exported on first use (the conformer with int8)."""
    root, done = tmp_path_factory.mktemp("exported"), {}

    def get(name: str):
        if name not in done:
            done[name] = export_model(model_dirs[name], root / name, int8=name == "conformer")
        return done[name].out_dir

    return get


@pytest.fixture(scope="module")
def test_audio(pipeline) -> list[tuple[str, np.ndarray, str]]:
    """(id, samples, reference) of the tiny pipeline's test set, read where run.sh ran."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(pipeline["workdir"])
        cuts = load_cuts(pipeline["workdir"] / "data/fbank/cuts_test-clean.jsonl.gz")
        return [(c.id, c.load_audio()[0], c.supervisions[0].text) for c in cuts]


def _torch_greedy(model: NativeModel, ort: OrtCtc, samples: np.ndarray) -> str:
    """comflp's greedy transcript of a waveform, the fbank computed as ``OrtCtc`` does."""
    mean, std = model.cmvn
    feats = (torch.from_numpy(ort.fbank.extract(samples, 16000)) - mean) / std
    with torch.no_grad():
        log_probs, lens = model.asr.ctc_log_probs(feats[None], torch.tensor([len(feats)]))
    return normalise(model.tokenizer.decode(ctc_greedy_search(log_probs, lens)[0]))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_log_probs_equal_torch(name, model_dirs, exported, test_audio):
    """A padded batch of the built-in test utterances: onnxruntime's log-probabilities and
    lengths equal torch's on every valid frame (atol 1e-4)."""
    model = NativeModel.load(model_dirs[name])
    ort = OrtCtc(exported(name))
    fbank = [torch.from_numpy(ort.features(samples)) for _, samples, _ in test_audio]
    feats, lens = pad_sequences(fbank)
    got, got_lens = ort.log_probs(feats.numpy(), lens.numpy())
    mean, std = model.cmvn
    normalised = pad_sequences(
        [torch.from_numpy(ort.fbank.extract(s, 16000)) for _, s, _ in test_audio]
    )[0]
    with torch.no_grad():
        ref, ref_lens = model.asr.ctc_log_probs((normalised - mean) / std, lens)
    assert got_lens.tolist() == ref_lens.tolist()
    for i, n in enumerate(ref_lens.tolist()):
        np.testing.assert_allclose(got[i, :n], ref[i, :n].numpy(), rtol=0, atol=1e-4)
    info = json.loads((exported(name) / "export.json").read_text())
    assert info["metadata"]["vocab_size"] == len(read_tokens(exported(name) / "tokens.txt"))
    assert info["metadata"]["comflp_num_layers"] == model.num_layers


@pytest.mark.parametrize("name", ("conformer", "structured"))
def test_sherpa_onnx_transcribes_as_comflp(name, model_dirs, exported, test_audio):
    """sherpa-onnx's own recogniser (its fbank, its greedy search, tokens.txt) gives comflp's
    greedy transcripts (random-weight models: they say something on any input)."""
    rng = np.random.default_rng(0)
    audio = [s + rng.normal(0, NOISE_FLOOR, len(s)).astype(np.float32) for _, s, _ in test_audio]
    model = NativeModel.load(model_dirs[name])
    expected = [_torch_greedy(model, OrtCtc(exported(name)), s) for s in audio]
    assert sum(map(len, expected)) > 100
    assert [SherpaCtc(exported(name)).transcribe(s) for s in audio] == expected


def test_int8_model(exported, test_audio):
    """model.int8.onnx: the float32 graph with every weight matrix product in int8
    (MatMulInteger), the same metadata, and sherpa-onnx decodes it as it decodes float32: the
    transcripts differ in at most 5% of their characters (the test's Conformer is not trained,
    so its CER against the references says nothing; docs/BENCHMARKS.md compares the CERs of
    the full-size model's int8 and float32 exports: within 0.2 points)."""
    import onnx

    graphs = {k: onnx.load(exported("conformer") / f"model{k}.onnx") for k in ("", ".int8")}
    ops = {k: [n.op_type for n in g.graph.node] for k, g in graphs.items()}
    weights = {i.name for i in graphs[""].graph.initializer}
    weight_matmuls = sum(
        n.op_type == "MatMul" and n.input[1] in weights for n in graphs[""].graph.node
    )
    assert weight_matmuls > 0 and ops[".int8"].count("MatMulInteger") == weight_matmuls
    assert ops[".int8"].count("MatMul") == ops[""].count("MatMul") - weight_matmuls
    meta = {k: {p.key: p.value for p in g.metadata_props} for k, g in graphs.items()}
    assert {k: v for k, v in meta[".int8"].items() if k in meta[""]} == meta[""]
    hyps = {
        precision: [
            SherpaCtc(exported("conformer"), int8=int8).transcribe(s) for _, s, _ in test_audio
        ]
        for precision, int8 in (("float32", False), ("int8", True))
    }
    assert sum(map(len, hyps["float32"])) > 100
    assert error_stats(hyps["float32"], hyps["int8"], "char").err <= 5.0


# group-norm front end without a mask, unpruned; WavLM without its first layer (the relative
# position embedding moved to the new first layer), as stage 6 writes it
HF_CASES = [("wav2vec2", []), ("wavlm", [1])]


@pytest.mark.parametrize("kind, pruned", HF_CASES)
def test_hf_onnx_log_probs_equal_torch(kind, pruned, tiny_data, tmp_path):
    """A Hugging Face CTC model's graph takes raw samples (the processor's normalisation
    inside) and gives the adapter's log-probabilities, utterance by utterance (atol 1e-4): a
    processor without attention masks normalises a padded batch over its padding too."""
    pytest.importorskip("transformers")
    from comflp.adapters.hf import HFModel
    from comflp.export.graph import ort_session
    from tests.test_hf import build

    model_dir = build(tmp_path / kind, kind)
    if pruned:
        HFModel.load(model_dir).prune(pruned).save(tmp_path / "pruned")
        model_dir = tmp_path / "pruned"
    out = export_model(model_dir, tmp_path / "onnx").out_dir
    model, session = HFModel.load(model_dir), ort_session(out / "model.onnx")
    for cut in load_cuts(tiny_data["test"]):
        batch = model.dataset()[CutSet.from_cuts([cut])]
        samples = cut.load_audio()[:1]
        got, got_lens = session.run(
            None, {"samples": samples, "sample_lens": np.array([samples.shape[1]])}
        )
        with torch.no_grad():
            ref, ref_lens = model.log_probs(batch)
        assert got_lens.tolist() == ref_lens.tolist()
        np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=0, atol=1e-4)
    assert (out / "vocab.json").is_file() and not (out / "tokens.txt").exists()
    assert json.loads((out / "export.json").read_text())["metadata"]["num_layers"] == 4 - len(
        pruned
    )


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _bad_hf_dir(root):
    """A save_pretrained-looking directory of an architecture comflp cannot export."""
    root.mkdir()
    (root / "config.json").write_text(
        json.dumps({"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]})
    )
    return root


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_a_model", "not a model directory (expected config.yaml and model.pt"),
        ("missing", "not a directory"),
        ("unknown_type", "--model_type kaldi: unknown; export supports native, hf or auto"),
        ("no_exporter", "--model_type espnet: no exporter for this model type; export supports"),
        ("unsupported_architecture", "unsupported architecture"),
        ("opset_13", "--opset 13: comflp models export at opset 18 to 22"),
        ("opset_23", "--opset 23: comflp models export at opset 18 to 22"),
        ("into_the_model", "would replace the model directory"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(case, expected, model_dirs, tmp_path):
    pytest.importorskip("transformers")
    model, out, options = model_dirs["layer_pruned"], tmp_path / "out", {}
    if case == "not_a_model":
        model = tmp_path
    elif case == "missing":
        model = tmp_path / "nowhere"
    elif case == "unknown_type":
        options = {"model_type": "kaldi"}
    elif case == "no_exporter":
        options = {"model_type": "espnet"}
    elif case == "unsupported_architecture":
        model = _bad_hf_dir(tmp_path / "whisper")
    elif case.startswith("opset"):
        options = {"opset": int(case.split("_")[1])}
    elif case == "into_the_model":
        out = model.parent
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(ExportError) as error:
        export_model(model, out, **options)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_a_failed_export_leaves_the_previous_one(model_dirs, exported, tmp_path, monkeypatch):
    out = shutil.copytree(exported("layer_pruned"), tmp_path / "onnx")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(src, dst):
        dst.write_bytes(b"half")
        raise ExportError(f"{src}: int8 quantisation failed (test)")

    monkeypatch.setattr(export_core, "quantize_int8", broken)
    with pytest.raises(ExportError, match="int8 quantisation failed"):
        export_model(model_dirs["structured"], out, int8=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.e2e
def test_export_command_and_sherpa_onnx_on_the_exported_directory(
    pipeline, tiny_data, test_audio, tmp_path
):
    """bin/export.py on the tiny baseline; sherpa-onnx's CER on the test set within 0.3 points
    (2 characters at least) of stage 7's decoding (comflp's stored lilcom features, up to 1/64 off lhotse's fbank); a
    directory that is not a model: exit 1 and one error line naming it, nothing written."""
    out = tmp_path / "onnx"
    export = [PYTHON, REPO / "bin/export.py", "--model_dir", pipeline["exp_dir"]]
    run_cmd([*export, "--out_dir", out, "--int8", "true"])
    files = ["export.json", "model.int8.onnx", "model.onnx", "tokens.txt"]
    assert sorted(p.name for p in out.iterdir()) == files
    sherpa = SherpaCtc(out)
    by_id = {utt_id: sherpa.transcribe(s) for utt_id, s, _ in test_audio}
    model = NativeModel.load(pipeline["exp_dir"])
    stage7 = decode_set(model, load_eval_batches(model, tiny_data["test"])).utts
    refs = [u["ref"] for u in stage7]
    sherpa_cer = error_stats(refs, [by_id[u["id"]] for u in stage7], "char").err
    comflp_cer = error_stats(refs, [u["hyp"] for u in stage7], "char").err
    # 0.3 points, but at least 2 characters of the tiny test set (about 230: one character is
    # 0.44 points, and the two front ends' features differ by up to 1/64)
    chars = error_stats(refs, refs, "char").wrd  # reference characters, as the CER counts them
    assert abs(sherpa_cer - comflp_cer) <= max(0.3, 100 * 2 / chars), (sherpa_cer, comflp_cer)
    bad = run_cmd([*export[:2], "--model_dir", tmp_path, "--out_dir", tmp_path / "x"], check=False)
    errors = [line for line in bad.stderr.splitlines() if " ERROR " in line]
    assert bad.returncode == 1 and len(errors) == 1 and f"--model_dir {tmp_path}:" in errors[0]
    assert not (tmp_path / "x").exists()
