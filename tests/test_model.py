"""Model: shapes and padding, intermediate CTC, stochastic depth, physical layer pruning."""

import pytest
import torch

from comflp.asr.config import ModelConfig
from comflp.asr.model import ASRModel, padding_mask, prune_layers, subsampled_lengths


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
    x, out_lens = model.encoder.embed(feats, lens)
    mask = ~padding_mask(out_lens, x.size(1))[:, None, None, :]
    for k in (1, 3, 5, 6):
        x = model.encoder.layers[k - 1](x, mask)
    manual = model.ctc(model.encoder.after_norm(x)).log_softmax(-1)
    got, _ = pruned.ctc_log_probs(feats, lens)
    assert torch.allclose(got, manual, atol=1e-6)
    # Pruning twice composes the provenance.
    again = prune_layers(pruned, [1])
    assert again.cfg.kept_layers == [3, 5, 6]
    # A readout landing on the new last layer is dropped.
    assert prune_layers(model, [6]).cfg.interctc_layers == [2, 3]
    assert prune_layers(model, [4, 6]).cfg.interctc_layers == [2, 3]


@pytest.mark.parametrize("bad", [[0], [7], [1, 2, 3, 4, 5, 6], []])
def test_prune_layers_rejects_bad_sets(bad):
    with pytest.raises(ValueError):
        prune_layers(tiny(num_layers=6), bad)
