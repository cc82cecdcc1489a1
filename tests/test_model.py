"""Model: shapes and padding, intermediate CTC, stochastic depth, physical layer pruning."""

import pytest
import torch

from comflp.asr.config import ModelConfig
from comflp.asr.layers import padding_mask, subsampled_lengths
from comflp.asr.model import ASRModel, count_parameters, prune_layers


def tiny(**kw) -> ASRModel:
    cfg = dict(
        vocab_size=12,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        num_layers=4,
        subsampling_channels=4,
        dropout=0.0,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return ASRModel(ModelConfig(**cfg)).eval()


def batch(lengths=(40, 27, 9)):
    torch.manual_seed(1)
    feats = torch.randn(len(lengths), max(lengths), 80)
    lens = torch.tensor(lengths)
    targets = torch.randint(1, 11, (len(lengths), 3))
    return feats, lens, targets, torch.tensor([3, 2, 1])


def test_subsampling_lengths_and_output_shape():
    model = tiny()
    feats, lens, _, _ = batch()
    log_probs, out_lens = model.ctc_log_probs(feats, lens)
    assert out_lens.tolist() == [9, 6, 1]  # ((T - 1) // 2 - 1) // 2
    assert out_lens.tolist() == subsampled_lengths(lens).tolist()
    assert log_probs.shape == (3, 9, 12)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 9), atol=1e-5)


def test_padding_does_not_change_valid_outputs():
    model = tiny()
    feats, lens, _, _ = batch()
    padded, _ = model.ctc_log_probs(feats, lens)
    for i, n in enumerate(lens.tolist()):
        alone, alone_lens = model.ctc_log_probs(feats[i : i + 1, :n], lens[i : i + 1])
        m = int(alone_lens[0])
        assert torch.allclose(padded[i, :m], alone[0, :m], atol=1e-5)


def test_upsampled_ctc_head_gives_u_frames_per_encoder_frame():
    model = tiny(ctc_upsample=2)
    feats, lens, targets, target_lens = batch()
    log_probs, out_lens = model.ctc_log_probs(feats, lens)
    assert out_lens.tolist() == [18, 12, 2]
    assert log_probs.shape == (3, 18, 12)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 18), atol=1e-5)
    # Frames 2t and 2t + 1 are the two halves of the head's output at encoder frame t.
    enc, _, _ = model.encoder(feats, lens)
    logits = model.ctc(enc)
    assert torch.allclose(log_probs[:, 1::2], logits[..., 12:].log_softmax(-1), atol=1e-5)
    loss, _ = model.train()(feats, lens, targets, target_lens)
    assert torch.isfinite(loss) and loss > 0
    padded, _ = model.ctc_log_probs(feats, lens)
    alone, _ = model.ctc_log_probs(feats[2:, :9], lens[2:])
    assert torch.allclose(padded[2, :2], alone[0], atol=1e-5)


def test_ctc_feasible_counts_upsampled_frames(tmp_path):
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut, dummy_features, dummy_supervision

    from comflp.asr.data import ctc_feasible
    from comflp.asr.tokenizer import train_tokenizer

    texts = ["AB " * 10, "AB AB"]  # 30 and 5 characters; 100 input frames give 24 CTC frames
    cuts = CutSet.from_cuts(
        dummy_cut(i, features=dummy_features(i), supervisions=[dummy_supervision(i, text=t)])
        for i, t in enumerate(texts)
    )
    tokenizer = train_tokenizer(texts, tmp_path, "char", 0)
    assert [c.id for c in ctc_feasible(cuts, tokenizer, "x")] == [cuts[1].id]
    assert len(ctc_feasible(cuts, tokenizer, "x", ctc_upsample=2)) == 2


def test_padding_mask():
    assert padding_mask(torch.tensor([2, 0, 3])).tolist() == [
        [False, False, True],
        [True, True, True],
        [False, False, False],
    ]


def test_intermediate_ctc_combination():
    w = 0.4
    model = tiny(interctc_layers=[1, 3], interctc_weight=w)
    loss, stats = model(*batch())
    expected = (1 - w) * stats["ctc"] + w * (stats["interctc_1"] + stats["interctc_3"]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Intermediate outputs go through the final norm and the shared CTC head: with the last
    # layers' weights zeroed (identity residual blocks), layer 3's readout equals the final.
    model2 = tiny(interctc_layers=[3], interctc_weight=w)
    with torch.no_grad():
        for p in model2.encoder.layers[3].parameters():
            p.zero_()
    _, stats2 = model2(*batch())
    assert stats2["interctc_3"] == pytest.approx(stats2["ctc"], rel=1e-5)


def test_hybrid_attention_loss():
    model = tiny(decoder_layers=1, ctc_weight=0.3)
    loss, stats = model(*batch())
    assert loss.item() == pytest.approx(0.3 * stats["ctc"] + 0.7 * stats["att"], rel=1e-5)
    loss.backward()
    assert model.decoder.out.weight.grad.abs().sum() > 0


def test_stochastic_depth_only_in_training():
    model = tiny(stochastic_depth_rate=[0.0, 0.0, 0.0, 0.9])
    feats, lens, _, _ = batch()
    layer = model.encoder.layers[3]
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    # eval: never skipped, never scaled, deterministic
    outs = [layer(x, mask) for _ in range(20)]
    assert all(torch.equal(outs[0], o) for o in outs)
    assert not torch.equal(outs[0], x)
    # train: skipped (identity) with probability 0.9, otherwise residual branches x 1/(1-p)
    layer.train()
    torch.manual_seed(3)
    results = [layer(x, mask) for _ in range(200)]
    skipped = sum(torch.equal(r, x) for r in results)
    assert 150 < skipped < 200
    kept = next(r for r in results if not torch.equal(r, x))
    s = 1 / (1 - 0.9)
    y = layer.norm_attn(x)
    x1 = x + s * layer.attn(y, y, y, mask)
    assert torch.allclose(kept, x1 + s * layer.ff(layer.norm_ff(x1)), atol=1e-5)
    layer.eval()
    # whole model in eval: repeated forwards identical
    a, _ = model.ctc_log_probs(feats, lens)
    b, _ = model.ctc_log_probs(feats, lens)
    assert torch.equal(a, b)


def test_prune_layers_removes_and_renumbers():
    model = tiny(
        num_layers=6, interctc_layers=[2, 3, 5], interctc_weight=0.3, stochastic_depth_rate=0.3
    )
    pruned = prune_layers(model, [2, 4])
    cfg = pruned.cfg
    assert cfg.num_layers == 4 and len(pruned.encoder.layers) == 4
    assert cfg.kept_layers == [1, 3, 5, 6]
    assert cfg.interctc_layers == [2, 3]  # old 3 -> 2, old 5 -> 3; old 2 removed
    assert cfg.layer_drop_rates() == pytest.approx([0.05, 0.15, 0.25, 0.3])
    # Forward equals running the original with those layers skipped.
    feats, lens, _, _ = batch()
    emb = model.encoder.embed(feats, lens)
    assert torch.equal(emb.mask, ~padding_mask(emb.lengths, emb.x.size(1))[:, None, None, :])
    x = emb.x
    for k in (1, 3, 5, 6):
        x = model.encoder.layers[k - 1](x, emb.mask)
    manual = model.ctc(model.encoder.after_norm(x)).log_softmax(-1)
    # forward_layers on a subset is the same loop
    subset = model.encoder.forward_layers(emb.x, emb.mask, (1, 3, 5, 6))
    assert torch.equal(subset, x)
    got, _ = pruned.ctc_log_probs(feats, lens)
    assert torch.allclose(got, manual, atol=1e-6)
    # Pruning twice composes the provenance.
    again = prune_layers(pruned, [1])
    assert again.cfg.kept_layers == [3, 5, 6]
    # A readout landing on the new last layer is dropped.
    assert prune_layers(model, [6]).cfg.interctc_layers == [2, 3]
    assert prune_layers(model, [4, 6]).cfg.interctc_layers == [2, 3]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([0], r"pruned layers \[0\] are outside 1..6"),
        ([7], r"pruned layers \[7\] are outside 1..6"),
        ([1, 2, 3, 4, 5, 6], "num_prune must be between 1 and 5, got 6"),
        ([], "num_prune must be between 1 and 5, got 0"),
    ],
)
def test_prune_layers_rejects_bad_sets(bad, message):
    with pytest.raises(ValueError, match=message):
        prune_layers(tiny(num_layers=6), bad)


def _layer_keys(prefix: str, names: str) -> list[str]:
    return [f"{prefix}.{n}.{p}" for n in names.split() for p in ("weight", "bias")]


# The state-dict layout of the uniform Transformer: checkpoints written before per-layer
# shapes and the Conformer existed must keep loading.
TRANSFORMER_KEYS = [
    *_layer_keys("encoder.embed", "conv.0 conv.2 out"),
    *_layer_keys("encoder.layers.0", "norm_attn attn.q attn.k attn.v attn.out norm_ff ff.0 ff.3"),
    *_layer_keys("encoder", "after_norm"),
    "ctc.weight",
    "ctc.bias",
    "decoder.embed.weight",
    *_layer_keys(
        "decoder.layers.0",
        "norm_self self_attn.q self_attn.k self_attn.v self_attn.out "
        "norm_src src_attn.q src_attn.k src_attn.v src_attn.out norm_ff ff.0 ff.3",
    ),
    *_layer_keys("decoder", "after_norm out"),
]


def test_transformer_state_dict_keys_and_seeded_init_are_unchanged():
    model = tiny(num_layers=1, decoder_layers=1, ctc_weight=0.5)
    state = model.state_dict()
    assert list(state) == TRANSFORMER_KEYS
    assert len(TRANSFORMER_KEYS) == 57
    # The random initialisation order: a seeded model is bit-identical to earlier versions.
    expected = {
        "encoder.layers.0.attn.out.weight": [0.247622, 0.126132, 0.244632],
        "encoder.layers.0.ff.3.weight": [-0.003699, 0.103483, 0.148689],
        "ctc.weight": [-0.227863, 0.217745, -0.068061],
        "decoder.out.weight": [0.0855, -0.148035, 0.137417],
    }
    for name, values in expected.items():
        assert state[name].flatten()[:3].tolist() == pytest.approx(values, abs=1e-6), name


def test_full_layer_shapes_equal_the_default_model():
    default = tiny()
    shaped = tiny(layer_shapes=[{"heads": 2, "ffn": 32}] * 4)
    assert list(shaped.state_dict()) == list(default.state_dict())
    shaped.load_state_dict(default.state_dict())
    feats, lens, _, _ = batch()
    assert torch.equal(shaped.ctc_log_probs(feats, lens)[0], default.ctc_log_probs(feats, lens)[0])


def test_transformer_layer_shapes_cut_heads_and_units():
    shapes = [
        {"heads": 1, "ffn": 5},
        {"heads": 0, "ffn": 32},
        {"heads": 2, "ffn": 0},
        {"heads": 0, "ffn": 0},
    ]
    model = tiny(layer_shapes=shapes)
    d, dk = 16, 8
    per_layer = sum(
        (2 * d + 3 * (d * h * dk + h * dk) + h * dk * d + d if h else 0)
        + (2 * d + 2 * d * n + n + d if n else 0)
        for h, n in ((s["heads"], s["ffn"]) for s in shapes)
    )
    fixed = count_parameters(tiny(num_layers=1)) - count_parameters(
        tiny(num_layers=1).encoder.layers
    )
    assert count_parameters(model) == fixed + per_layer
    assert model.encoder.layers[1].attn is None and model.encoder.layers[2].ff is None
    assert model.cfg.layer_shape(1) == {"heads": 1, "ffn": 5}
    feats, lens, _, _ = batch()
    assert torch.isfinite(model.ctc_log_probs(feats, lens)[0]).all()
    pruned = prune_layers(model, [2])
    assert pruned.cfg.layer_shapes == [shapes[0], shapes[2], shapes[3]]

    # Head 1 is rows 8:16 of q/k/v and columns 8:16 of out; unit i is row i of ff.0 and
    # column i of ff.3: cutting them equals zeroing their output columns in the full model.
    full = tiny(num_layers=1)
    small = tiny(num_layers=1, layer_shapes=[{"heads": 1, "ffn": 3}])
    units = torch.tensor([2, 7, 30])
    state = full.state_dict()
    for m in ("q", "k", "v"):
        for p in ("weight", "bias"):
            state[f"encoder.layers.0.attn.{m}.{p}"] = state[f"encoder.layers.0.attn.{m}.{p}"][dk:]
    state["encoder.layers.0.attn.out.weight"] = state["encoder.layers.0.attn.out.weight"][:, dk:]
    state["encoder.layers.0.ff.0.weight"] = state["encoder.layers.0.ff.0.weight"][units]
    state["encoder.layers.0.ff.0.bias"] = state["encoder.layers.0.ff.0.bias"][units]
    state["encoder.layers.0.ff.3.weight"] = state["encoder.layers.0.ff.3.weight"][:, units]
    small.load_state_dict(state)
    with torch.no_grad():
        layer = full.encoder.layers[0]
        layer.attn.out.weight[:, :dk] = 0
        gone = [i for i in range(32) if i not in units.tolist()]
        layer.ff[3].weight[:, gone] = 0
    assert torch.allclose(
        small.ctc_log_probs(feats, lens)[0], full.ctc_log_probs(feats, lens)[0], atol=1e-5
    )
