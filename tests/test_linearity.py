"""The residual-sum score's first-order check (comflp/quality/linearity.py) on stacks whose
answer is known: additive layers (the first-order view exact) and a layer that doubles its
input (the later layer's reaction exactly as large as the update)."""

from __future__ import annotations

import pytest
import torch

from comflp.adapters.base import Hidden
from comflp.quality.linearity import first_order_errors


class KnownLayers:
    """A 2-layer encoder: layer 1 adds ``c``; layer 2 adds ``c2`` or, with ``doubling``, doubles
    its input. Frames past a batch's lengths hold garbage the check must not read."""

    stacks = ("encoder",)
    num_layers = 2

    def __init__(self, doubling: bool):
        self.doubling = doubling
        self.c = torch.tensor([1.0, 2.0, 0.5])
        self.c2 = torch.tensor([-0.5, 0.0, 3.0])

    def embed(self, batch: dict) -> Hidden:
        return Hidden(batch["x"].clone(), batch["lengths"])

    def forward_layers(self, h: Hidden, layers=None) -> Hidden:
        x = h.x
        for k in layers if layers is not None else (1, 2):
            if k == 1:
                x = x + self.c
            else:
                x = 2 * x if self.doubling else x + self.c2
        return Hidden(x, h.lengths)


def _batch() -> dict:
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    x[1, 3:] = 1e6  # padding
    return {"x": x, "lengths": torch.tensor([5, 3]), "ids": ["a", "b"]}


def test_additive_layers_are_first_order_exact():
    rows = first_order_errors(KnownLayers(doubling=False), [_batch()])
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reaction"] == pytest.approx(0.0, abs=1e-6)
        assert r["cosine"] == pytest.approx(1.0) and r["gain"] == pytest.approx(1.0)
    b, known = _batch(), KnownLayers(doubling=False)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    top = (b["x"] + known.c + known.c2)[valid].double()
    want = (8 * known.c.double().square().sum() / top.square().sum()) ** 0.5
    assert rows[0]["update"] == pytest.approx(float(want))


def test_a_doubling_layer_reacts_as_much_as_the_update():
    layer1, layer2 = first_order_errors(KnownLayers(doubling=True), [_batch()])
    # without layer 1 the top is 2 x0, the score predicts 2 (x0 + c) - c: off by c, |d_1| = |c|
    assert layer1["reaction"] == pytest.approx(1.0)
    assert layer1["cosine"] == pytest.approx(1.0)  # the change, -2c, still points along -c
    assert layer1["gain"] == pytest.approx(2.0)  # and is twice as long
    assert layer2["gain"] == pytest.approx(1.0)
    assert layer2["reaction"] == pytest.approx(0.0, abs=1e-6)  # the top layer: nothing after it
