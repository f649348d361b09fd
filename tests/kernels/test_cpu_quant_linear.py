"""QuantLinear, the linear layer over these kernels: layers stacked into one give each layer's own outputs bit for
bit, and 8-bit activations stay within 1e-2 of the exact product at decode (prefill stays exact)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.layers.quant_linear import DECODE_ROWS, QuantLinear


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("activations", ["f32", "int8"])
@pytest.mark.parametrize("n_tokens", [1, DECODE_ROWS + 2])
def test_stacked_layers_give_each_layers_outputs(case, qtype, activations, n_tokens):
    # 96 rows: the second layer's rows start inside a tile of the stacked copy
    cases = [case(qtype, rows, 512, n_tokens, seed=i) for i, rows in enumerate((96, 32, 48))]
    biases = [torch.randn(c.w.shape[0]) for c in cases]
    layers = [QuantLinear(c.w_raw, qtype, c.w.shape[0], 512, b, activations) for c, b in zip(cases, biases)]
    stacked = QuantLinear.stack(layers)
    x = torch.from_numpy(cases[0].x)
    with torch.no_grad():
        want = torch.cat([layer(x) for layer in layers], dim=-1)
        assert torch.equal(stacked(x), want)
        assert torch.equal(stacked(x[None])[0], want)  # [B, T, K] inputs too


def test_layers_that_do_not_fit_together_are_not_stacked(case):
    a, b = case(T.Q8_0, 32, 512, 1), case(T.Q4_K, 32, 512, 1)
    assert QuantLinear.stack([QuantLinear(a.w_raw, T.Q8_0, 32, 512), QuantLinear(b.w_raw, T.Q4_K, 32, 512)]) is None
    assert QuantLinear.stack([QuantLinear(a.w_raw, T.Q8_0, 32, 512),
                              QuantLinear(a.w_raw, T.Q8_0, 32, 512, activations="int8")]) is None
    with pytest.raises(ValueError, match="rows"):
        QuantLinear(a.w_raw, T.Q8_0, 33, 512)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_int8_activations_round_decode_and_prefill_alike(case, qtype):
    c = case(qtype, 80, 1024, DECODE_ROWS + 2)
    layer = QuantLinear(c.w_raw, qtype, 80, 1024, activations="int8")
    exact = QuantLinear(c.w_raw, qtype, 80, 1024)
    x = torch.from_numpy(c.x)
    with torch.no_grad():
        decode = np.concatenate([layer(x[i:i + 1]).numpy() for i in range(len(c.x))])
        assert 1e-6 < c.rel_error(decode) < 1e-2  # rounded, and within the kernels' bound
        assert np.array_equal(layer(x).numpy(), decode)  # prefill: the same kernels, row by row the same bits
        assert c.rel_error(exact(x).numpy()) < 1e-5  # exact activations: float32 tiles


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K], ids=lambda q: q.name)
def test_an_mlps_three_layers_decode_in_one_call_as_one_after_another(case, qtype):
    from hybridmoe.layers.mlp import MLP
    gate, up = case(qtype, 512, 256, 2, seed=1), case(qtype, 512, 256, 2, seed=2)
    down = case(qtype, 256, 512, 2, seed=3)
    mlp = MLP(256, 512)
    for name, c in (("gate", gate), ("up", up), ("down", down)):
        setattr(mlp, name, QuantLinear(c.w_raw, qtype, *c.w.shape, activations="int8"))
    x = torch.from_numpy(gate.x)
    with torch.no_grad():
        chained = mlp(x[None])  # not fused yet: three layers, each rounding its input
        assert mlp.fuse()
        fused = mlp(x[None])
        assert fused.shape == chained.shape == (1, 2, 256)
        assert ((fused - chained).abs().max() / chained.abs().max()).item() < 1e-5
        many = x.repeat(3, 1)  # more rows than a decode step: the three layers
        assert torch.equal(mlp(many), mlp.down(torch.nn.functional.silu(mlp.gate(many)) * mlp.up(many)))
    plain = MLP(256, 512)
    assert not plain.fuse()
    for name, c in (("gate", gate), ("up", up), ("down", down)):
        setattr(plain, name, QuantLinear(c.w_raw, qtype, *c.w.shape, activations="f32"))
    assert not plain.fuse()  # exact activations keep the three layers
