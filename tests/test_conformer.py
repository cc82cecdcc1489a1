"""Conformer encoder and per-layer module shapes: relative-position attention, the Conformer
block, padding, stochastic depth, intermediate CTC, layer pruning and structured shapes."""

import math

import pytest
import torch

from comflp.asr.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    config_from_dict,
    load_config,
    save_config,
)
from comflp.asr.layers import (
    ConformerLayer,
    RelPositionalEncoding,
    RelPositionMultiHeadAttention,
    attention_mask,
    rel_shift,
    subsampled_lengths,
)
from comflp.asr.model import ASRModel, count_parameters, prune_layers

D, HEADS, FFN, KERNEL, CHANNELS, VOCAB = 16, 2, 32, 5, 4, 12


def tiny_cfg(**kw) -> ModelConfig:
    cfg = dict(
        encoder_type="conformer",
        vocab_size=VOCAB,
        d_model=D,
        num_heads=HEADS,
        ffn_dim=FFN,
        conv_kernel=KERNEL,
        num_layers=4,
        subsampling_channels=CHANNELS,
        dropout=0.0,
    )
    cfg.update(kw)
    return ModelConfig(**cfg)


def tiny(**kw) -> ASRModel:
    torch.manual_seed(0)
    model = ASRModel(tiny_cfg(**kw))
    randomise_batch_norms(model)
    return model.eval()


def randomise_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so that eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def batch(lengths=(40, 27, 9)):
    torch.manual_seed(1)
    feats = torch.randn(len(lengths), max(lengths), 80)
    lens = torch.tensor(lengths)
    targets = torch.randint(1, VOCAB - 1, (len(lengths), 3))
    return feats, lens, targets, torch.tensor([3, 2, 1])


def sinusoid(r: float, d: int) -> torch.Tensor:
    """Transformer-XL embedding of relative position r, written out element by element."""
    out = torch.zeros(d)
    for i in range(0, d, 2):
        out[i] = math.sin(r / 10000 ** (i / d))
        out[i + 1] = math.cos(r / 10000 ** (i / d))
    return out


# --- relative positions ------------------------------------------------------------------


def test_relative_position_embeddings():
    pos = RelPositionalEncoding(D, 0.0)
    x = torch.randn(2, 5, D)
    y, pe = pos(x)
    assert torch.allclose(y, x * math.sqrt(D))
    assert pe.shape == (1, 9, D)
    for m in range(9):  # row m is relative position 4 - m
        assert torch.allclose(pe[0, m], sinusoid(4 - m, D), atol=1e-5)
    # The table grows for long inputs and gives the same embeddings.
    small = RelPositionalEncoding(D, 0.0, max_len=3)
    _, pe_small = small(x)
    assert torch.allclose(pe_small, pe, atol=1e-6)


def test_rel_shift_picks_relative_position_i_minus_j():
    t = 6
    x = torch.randn(2, 3, t, 2 * t - 1)
    shifted = rel_shift(x)
    assert shifted.shape == (2, 3, t, t)
    for i in range(t):
        for j in range(t):
            # column m of the input holds relative position t - 1 - m
            m = next(m for m in range(2 * t - 1) if t - 1 - m == i - j)
            assert torch.equal(shifted[:, :, i, j], x[:, :, i, m])
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 7\) scores, got \(1, 1, 4, 6\)"):
        rel_shift(torch.randn(1, 1, 4, 6))


def test_rel_attention_matches_explicit_loop():
    torch.manual_seed(0)
    h, dk, t = 2, 4, 5
    attn = RelPositionMultiHeadAttention(D, h, dk, 0.0).eval()
    x = torch.randn(1, t, D)
    mask = attention_mask(torch.tensor([t]), t)
    _, pe = RelPositionalEncoding(D, 0.0)(x)
    got = attn(x, x, x, mask, pe)

    q = attn.q(x)[0].view(t, h, dk)
    k = attn.k(x)[0].view(t, h, dk)
    v = attn.v(x)[0].view(t, h, dk)
    u, w = attn.pos_bias_u, attn.pos_bias_v
    heads = []
    for a in range(h):
        scores = torch.zeros(t, t)
        for i in range(t):
            for j in range(t):
                p = attn.pos(sinusoid(i - j, D)).view(h, dk)[a]
                scores[i, j] = ((q[i, a] + u[a]) @ k[j, a] + (q[i, a] + w[a]) @ p) / math.sqrt(dk)
        heads.append(scores.softmax(-1) @ v[:, a])
    expected = attn.out(torch.cat(heads, dim=-1))
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_rel_attention_ignores_padding():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(D, HEADS, D // HEADS, 0.0).eval()
    pos = RelPositionalEncoding(D, 0.0)
    lens = torch.tensor([7, 4, 2])
    x = torch.randn(3, 7, D)
    _, pe = pos(x)
    padded = attn(x, x, x, attention_mask(lens, 7), pe)
    for i, n in enumerate(lens.tolist()):
        xi = x[i : i + 1, :n]
        _, pe_i = pos(xi)
        alone = attn(xi, xi, xi, attention_mask(lens[i : i + 1], n), pe_i)
        assert torch.allclose(padded[i, :n], alone[0], atol=1e-5)
    # Changing padded frames does not change valid outputs either.
    noisy = x.clone()
    noisy[1, 4:] = 100.0
    again = attn(noisy, noisy, noisy, attention_mask(lens, 7), pe)
    assert torch.allclose(again[1, :4], padded[1, :4], atol=1e-5)


# --- the model ---------------------------------------------------------------------------


def test_shapes_and_output_lengths():
    model = tiny(ctc_upsample=2)
    feats, lens, _, _ = batch()
    emb = model.encoder.embed(feats, lens)
    assert emb.x.shape == (3, 9, D) and emb.pos_emb.shape == (1, 17, D)
    assert emb.lengths.tolist() == subsampled_lengths(lens).tolist() == [9, 6, 1]
    log_probs, out_lens = model.ctc_log_probs(feats, lens)
    assert out_lens.tolist() == [18, 12, 2]
    assert log_probs.shape == (3, 18, VOCAB)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 18), atol=1e-5)
    layer = model.encoder.layers[0]
    assert isinstance(layer, ConformerLayer)
    with pytest.raises(ValueError, match="relative position"):
        layer(emb.x, emb.mask)


def test_padding_does_not_change_valid_outputs():
    model = tiny()
    feats, lens, _, _ = batch()
    padded, _ = model.ctc_log_probs(feats, lens)
    for i, n in enumerate(lens.tolist()):
        alone, alone_lens = model.ctc_log_probs(feats[i : i + 1, :n], lens[i : i + 1])
        m = int(alone_lens[0])
        assert torch.allclose(padded[i, :m], alone[0, :m], atol=1e-5)


def test_training_step_backward():
    model = tiny(dropout=0.1, stochastic_depth_rate=0.2).train()
    loss, stats = model(*batch())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def hand_block(layer: ConformerLayer, x, mask, pos_emb, s: float) -> torch.Tensor:
    x = x + 0.5 * s * layer.ff1(layer.norm_ff1(x))
    y = layer.norm_attn(x)
    x = x + s * layer.attn(y, y, y, mask, pos_emb)
    x = x + s * layer.conv(layer.norm_conv(x), mask)
    x = x + 0.5 * s * layer.ff2(layer.norm_ff2(x))
    return layer.norm_final(x)


def test_stochastic_depth_only_in_training():
    model = tiny(stochastic_depth_rate=[0.0, 0.0, 0.5, 0.999])
    feats, lens, _, _ = batch()
    emb = model.encoder.embed(feats, lens)
    x, mask, pe = emb.x, emb.mask, emb.pos_emb
    # eval: never skipped, never scaled, deterministic
    for k in (2, 3):
        layer = model.encoder.layers[k]
        outs = [layer(x, mask, pe) for _ in range(10)]
        assert all(torch.equal(outs[0], o) for o in outs)
        assert torch.allclose(outs[0], hand_block(layer, x, mask, pe, 1.0), atol=1e-5)
    # train, drop rate near 1: the block is the identity (x returned unchanged)
    nearly_always = model.encoder.layers[3].train()
    torch.manual_seed(3)
    assert all(nearly_always(x, mask, pe) is x for _ in range(20))
    # train, drop rate 0.5: one uniform draw decides; a kept block scales every branch by 2
    layer = model.encoder.layers[2].train()
    kept = skipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        keep = bool(torch.rand(()) >= 0.5)
        torch.manual_seed(seed)
        out = layer(x, mask, pe)
        if keep:
            kept += 1
            assert torch.allclose(out, hand_block(layer, x, mask, pe, 2.0), atol=1e-5)
        else:
            skipped += 1
            assert out is x
    assert kept and skipped
    model.eval()
    a, _ = model.ctc_log_probs(feats, lens)
    b, _ = model.ctc_log_probs(feats, lens)
    assert torch.equal(a, b)


def test_intermediate_ctc():
    w = 0.4
    model = tiny(interctc_layers=[1, 3], interctc_weight=w)
    loss, stats = model(*batch())
    assert {"ctc", "interctc_1", "interctc_3", "loss"} <= set(stats)
    expected = (1 - w) * stats["ctc"] + w * (stats["interctc_1"] + stats["interctc_3"]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the readout of layer 3 is the final norm + CTC head on layer 3's output
    feats, lens, targets, target_lens = batch()
    emb = model.encoder.embed(feats, lens)
    h3 = model.encoder.forward_layers(emb.x, emb.mask, (1, 2, 3), emb.pos_emb)
    _, _, inter = model.encoder(feats, lens, (3,))
    assert torch.allclose(inter[3], model.encoder.after_norm(h3), atol=1e-6)


SHAPES = [
    {"heads": 2, "ffn1": 32, "ffn2": 32, "conv": 16},
    {"heads": 1, "ffn1": 0, "ffn2": 20, "conv": 7},
    {"heads": 0, "ffn1": 9, "ffn2": 0, "conv": 0},
    {"heads": 2, "ffn1": 5, "ffn2": 3, "conv": 16},
]


def test_prune_layers_on_a_conformer():
    model = tiny(
        num_layers=4,
        interctc_layers=[1, 2],
        interctc_weight=0.3,
        stochastic_depth_rate=0.2,
        layer_shapes=SHAPES,
    )
    pruned = prune_layers(model, [2])
    cfg = pruned.cfg
    assert cfg.num_layers == 3 and cfg.kept_layers == [1, 3, 4]
    assert cfg.layer_shapes == [SHAPES[0], SHAPES[2], SHAPES[3]]
    assert cfg.interctc_layers == [1] and cfg.encoder_type == "conformer"
    assert [cfg.layer_shape(k) for k in (1, 2, 3)] == cfg.layer_shapes
    feats, lens, _, _ = batch()
    emb = model.encoder.embed(feats, lens)
    x = emb.x
    for k in (1, 3, 4):
        x = model.encoder.layers[k - 1](x, emb.mask, emb.pos_emb)
    manual, _ = model.readout(x, emb.lengths)
    got, _ = pruned.ctc_log_probs(feats, lens)
    assert torch.allclose(got, manual, atol=1e-6)
    assert prune_layers(pruned, [1]).cfg.layer_shapes == [SHAPES[2], SHAPES[3]]
    # uniform models keep layer_shapes None
    assert prune_layers(tiny(), [1]).cfg.layer_shapes is None


def expected_conformer_params(cfg: ModelConfig) -> int:
    d, dk, k = cfg.d_model, cfg.d_model // cfg.num_heads, cfg.conv_kernel
    c0 = cfg.subsampling_channels
    freq = ((cfg.input_dim - 1) // 2 - 1) // 2
    front = (9 * c0 + c0) + (9 * c0 * c0 + c0) + (c0 * freq * d + d)
    head = 2 * d + d * cfg.vocab_size * cfg.ctc_upsample + cfg.vocab_size * cfg.ctc_upsample
    total = front + head
    for layer in range(1, cfg.num_layers + 1):
        s = cfg.layer_shape(layer)
        h, c = s["heads"], s["conv"]
        for n in (s["ffn1"], s["ffn2"]):
            total += (2 * d + 2 * d * n + n + d) if n else 0  # norm + two Linear
        if h:  # norm, q/k/v/out with biases, pos without, u and v
            total += 2 * d + 3 * (d * h * dk + h * dk) + (h * dk * d + d) + d * h * dk + 2 * h * dk
        if c:  # norm, pointwise (2c), depthwise, BatchNorm, pointwise back
            total += 2 * d + (d * 2 * c + 2 * c) + (c * k + c) + 2 * c + (c * d + d)
        total += 2 * d  # norm_final
    return total


def test_layer_shapes_build_run_count_and_round_trip(tmp_path):
    model = tiny(layer_shapes=SHAPES, ctc_upsample=2)
    assert count_parameters(model) == expected_conformer_params(model.cfg)
    assert count_parameters(tiny()) == expected_conformer_params(tiny().cfg)
    layer2, layer3 = model.encoder.layers[1], model.encoder.layers[2]
    assert layer2.ff1 is None and layer2.norm_ff1 is None
    assert layer2.attn.q.weight.shape == (1 * D // HEADS, D)
    assert layer2.attn.out.weight.shape == (D, D // HEADS)
    assert layer2.attn.pos_bias_u.shape == (1, D // HEADS)
    assert layer2.conv.pointwise1.weight.shape == (14, D, 1)
    assert layer2.conv.depthwise.weight.shape == (7, 1, KERNEL)
    assert layer3.attn is None and layer3.conv is None and layer3.ff2 is None
    assert not any(k.startswith("encoder.layers.2.attn") for k in model.state_dict())
    feats, lens, targets, target_lens = batch()
    log_probs, _ = model.ctc_log_probs(feats, lens)
    assert torch.isfinite(log_probs).all()
    loss, _ = model.train()(feats, lens, targets, target_lens)
    loss.backward()
    model.eval()

    path = tmp_path / "c.yaml"
    save_config(ExperimentConfig(model=model.cfg), path)
    loaded = load_config(path).model
    assert loaded == model.cfg and loaded.layer_shapes == SHAPES
    rebuilt = ASRModel(loaded).eval()
    rebuilt.load_state_dict(model.state_dict())  # (BatchNorm statistics moved in training)
    assert torch.equal(rebuilt.ctc_log_probs(feats, lens)[0], model.ctc_log_probs(feats, lens)[0])


def test_default_layer_shapes():
    cfg = tiny_cfg()
    assert cfg.layer_shape(1) == {"heads": HEADS, "ffn1": FFN, "ffn2": FFN, "conv": D}
    assert ModelConfig(num_layers=2).layer_shape(2) == {"heads": 4, "ffn": 576}
    with pytest.raises(IndexError, match="layer 5 is outside 1..4"):
        cfg.layer_shape(5)


def keep_units(model: ASRModel, shapes_kept: list[dict]) -> ASRModel:
    """The uniform ``model`` cut down to the kept head / unit / channel indices per layer."""
    shapes = [{k: len(v) for k, v in s.items()} for s in shapes_kept]
    cfg = tiny_cfg(num_layers=len(shapes), layer_shapes=shapes)
    small = ASRModel(cfg).eval()
    dk = D // HEADS
    state = model.state_dict()
    for n, kept in enumerate(shapes_kept):
        pre = f"encoder.layers.{n}."
        rows = torch.tensor(
            [h * dk + i for h in kept["heads"] for i in range(dk)], dtype=torch.long
        )
        for m in ("q", "k", "v", "pos"):
            state[pre + f"attn.{m}.weight"] = state[pre + f"attn.{m}.weight"][rows]
        for m in ("q", "k", "v"):
            state[pre + f"attn.{m}.bias"] = state[pre + f"attn.{m}.bias"][rows]
        state[pre + "attn.out.weight"] = state[pre + "attn.out.weight"][:, rows]
        for b in ("pos_bias_u", "pos_bias_v"):
            state[pre + f"attn.{b}"] = state[pre + f"attn.{b}"][kept["heads"]]
        for ff in ("ff1", "ff2"):
            units = torch.tensor(kept["ffn" + ff[-1]], dtype=torch.long)
            state[pre + f"{ff}.0.weight"] = state[pre + f"{ff}.0.weight"][units]
            state[pre + f"{ff}.0.bias"] = state[pre + f"{ff}.0.bias"][units]
            state[pre + f"{ff}.3.weight"] = state[pre + f"{ff}.3.weight"][:, units]
        ch = torch.tensor(kept["conv"], dtype=torch.long)
        both = torch.cat([ch, ch + D])  # value half and gate half of the GLU
        state[pre + "conv.pointwise1.weight"] = state[pre + "conv.pointwise1.weight"][both]
        state[pre + "conv.pointwise1.bias"] = state[pre + "conv.pointwise1.bias"][both]
        for name in ("depthwise.weight", "depthwise.bias", "norm.weight", "norm.bias"):
            state[pre + "conv." + name] = state[pre + "conv." + name][ch]
        for name in ("running_mean", "running_var"):
            state[pre + "conv.norm." + name] = state[pre + "conv.norm." + name][ch]
        state[pre + "conv.pointwise2.weight"] = state[pre + "conv.pointwise2.weight"][:, ch]
    small.load_state_dict(state)
    return small


def test_cutting_units_equals_zeroing_their_outputs():
    """Heads, feed-forward units and conv channels live where the docstrings say: cutting
    them out equals zeroing their columns of the output projection in the full model."""
    model = tiny(num_layers=1)
    kept = {"heads": [1], "ffn1": [0, 5, 31], "ffn2": list(range(1, 32)), "conv": [2, 3, 9]}
    small = keep_units(model, [kept])
    assert small.cfg.layer_shapes == [{"heads": 1, "ffn1": 3, "ffn2": 31, "conv": 3}]
    layer = model.encoder.layers[0]
    dk = D // HEADS
    with torch.no_grad():
        layer.attn.out.weight[:, 0:dk] = 0  # head 0
        for ff in ("ff1", "ff2"):
            gone = [i for i in range(FFN) if i not in kept["ffn" + ff[-1]]]
            getattr(layer, ff)[3].weight[:, gone] = 0
        gone = [i for i in range(D) if i not in kept["conv"]]
        layer.conv.pointwise2.weight[:, gone] = 0
    feats, lens, _, _ = batch()
    assert torch.allclose(
        small.ctc_log_probs(feats, lens)[0], model.ctc_log_probs(feats, lens)[0], atol=1e-5
    )


@pytest.mark.parametrize(
    "model, message",
    [
        ({"encoder_type": "lstm"}, "'encoder_type' must be one of 'transformer', 'conformer'"),
        ({"conv_kernel": 4}, "'conv_kernel' must be an odd integer >= 3"),
        ({"conv_kernel": 1}, "'conv_kernel' must be an odd integer >= 3"),
        ({"layer_shapes": SHAPES[:3]}, "'layer_shapes' needs one shape per layer"),
        (
            {"layer_shapes": [{"heads": 2, "ffn": 8}] * 4},
            "'layer_shapes' layer 1: a conformer layer needs exactly the keys heads, ffn1, ffn2, conv",
        ),
        (
            {"layer_shapes": [*SHAPES[:2], {**SHAPES[2], "conv": -1}, SHAPES[3]]},
            "'layer_shapes' layer 3: 'conv' must be an integer >= 0",
        ),
        (
            {"layer_shapes": [*SHAPES[:3], {**SHAPES[3], "heads": 1.5}]},
            "'layer_shapes' layer 4: 'heads' must be an integer >= 0",
        ),
        ({"layer_shapes": [1, 2, 3, 4]}, "'layer_shapes' must be list[dict] | None"),
    ],
)
def test_bad_configs_are_refused(model, message):
    data = {"model": {"encoder_type": "conformer", "num_layers": 4, **model}, "train": {}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "conf/x.yaml")
    assert message in str(err.value) and "conf/x.yaml" in str(err.value)


def test_transformer_layer_shapes_keys_are_checked():
    with pytest.raises(ConfigError, match="'layer_shapes' layer 2: a transformer layer needs"):
        ModelConfig(num_layers=2, layer_shapes=[{"heads": 1, "ffn": 3}, {"heads": 1}]).validate()
