"""Kernels with 8-bit activations: exact on activations that 8 bits per group of 32 represent exactly, within 1e-2
of the float64 reference on any others; one call for many experts gives each expert's own result bit for bit."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu
from hybridmoe.layers.moe import combine
from hybridmoe.quant import dequantize, get_format, random_blocks

TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def int8_exact(rng, n: int, k_dim: int) -> np.ndarray:
    """x = scale * q with q in [-127, 127], 127 in every group of 32, power-of-two scales: rounding x to 8 bits per
    group loses nothing, so the kernels must match the reference to float32 rounding."""
    q = rng.integers(-127, 128, (n, k_dim // 32, 32))
    q[..., 5] = 127
    return (q * 2.0 ** rng.integers(-8, 0, (n, k_dim // 32, 1))).reshape(n, k_dim).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 9])  # 9: Q8_0 takes 4 tokens per pass, then the last one
def test_int8_gemv_is_exact_on_8_bit_activations(case, qtype: T, n_tokens: int) -> None:
    c = case(qtype, 72, 768, n_tokens)  # 72 rows: the last tile of 16 is padded
    packed = cpu.repack(c.w_raw, qtype, activations="int8")
    assert (packed.n_rows, packed.n_cols, packed.lanes, packed.activations) == (72, 768, 16, "int8")
    x = int8_exact(np.random.default_rng(1), n_tokens, 768)
    want = x.astype(np.float64) @ c.w.T
    got = cpu.gemv_packed(x, packed)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_int8_gemv_rows_together_are_each_row_alone(qtype: T) -> None:
    """Prefill's rows (several per pass over a tile) give each row's decode result bit for bit."""
    rng = np.random.default_rng(4)
    w = random_blocks(qtype, 40 * 512 // get_format(qtype).block_size, rng).reshape(40, -1)
    packed = cpu.repack(w, qtype, activations="int8")
    x = rng.standard_normal((10, 512)).astype(np.float32)
    alone = np.concatenate([cpu.gemv_packed(x[t:t + 1], packed) for t in range(10)])
    assert np.array_equal(cpu.gemv_packed(x, packed), alone)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_int8_gemv_error_on_float_activations(case, qtype: T) -> None:
    c = case(qtype, 40, 1024, 2)
    assert c.rel_error(cpu.gemv_packed(c.x, cpu.repack(c.w_raw, qtype, activations="int8"))) < 1e-2


def expert_weights(rng, n_experts: int, dim: int, inter: int, types=(T.Q4_K, T.Q4_K, T.Q6_K)):
    """Raw stacked gate [E, I, D], up [E, I, D], down [E, D, I] and their float64 dequantizations."""
    raws, floats = [], []
    for qtype, (rows, cols) in zip(types, ((inter, dim), (inter, dim), (dim, inter))):
        fmt = get_format(qtype)
        raw = random_blocks(qtype, n_experts * rows * cols // fmt.block_size, rng, scale=0.05)
        raws.append(raw.reshape(n_experts, rows, -1))
        floats.append(dequantize(raw, qtype, (n_experts, rows, cols)).astype(np.float64))
    return raws, floats


def rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to 8 bits per group of 32 as the kernels do (scale max|x| / 127), in float64."""
    g = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(g).max(axis=-1, keepdims=True) / 127
    return (np.rint(g / np.where(d > 0, d, 1)) * d).reshape(x.shape)


def ffn_reference(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, rounding=lambda v: v):
    g, u = rounding(x) @ gate.T, rounding(x) @ up.T
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu's limit, -0
        return rounding(g / (1 + np.exp(-g)) * u) @ down.T


@pytest.mark.parametrize("types,inter", [((T.Q4_K, T.Q5_K, T.Q6_K), 256), ((T.Q4_0, T.Q8_0, T.Q8_0), 96)],
                         ids=["k-quants", "legacy"])
def test_int8_experts_in_one_call_match_each_expert_alone_and_the_reference(types, inter: int) -> None:
    rng = np.random.default_rng(0)
    (gate, up, down), floats = expert_weights(rng, 6, 256, inter, types)  # 96 rows: a padded tile
    stacked = [cpu.repack_experts(raw, t, activations="int8") for raw, t in zip((gate, up, down), types)]
    x = rng.standard_normal((2, 256)).astype(np.float32)
    experts = [4, 0, 5]
    y = cpu.ffn_experts(x, *stacked, experts)
    assert y.shape == (3, 2, 256)
    for g, e in enumerate(experts):
        alone = [cpu.repack(raw[e], t, activations="int8") for raw, t in zip((gate, up, down), types)]
        assert np.array_equal(cpu.ffn_packed(x, *alone), y[g])
        want = ffn_reference(x, *(f[e] for f in floats), rounded)  # the kernels' arithmetic, in float64
        assert np.abs(y[g] - want).max() / np.abs(want).max() < 1e-4
        exact = ffn_reference(x, *(f[e] for f in floats))
        assert np.abs(y[g] - exact).max() / np.abs(exact).max() < 3e-2  # random weights: a heavy-tailed hidden state


def test_f32_experts_match_ffn_packed_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    (gate, up, down), _ = expert_weights(rng, 3, 256, 256)
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    stacked = [cpu.repack_experts(raw, t) for raw, t in zip((gate, up, down), types)]
    x = rng.standard_normal((1, 256)).astype(np.float32)
    y = cpu.ffn_experts(x, *stacked, [2, 1])
    for g, e in enumerate([2, 1]):
        alone = [cpu.repack(raw[e], t) for raw, t in zip((gate, up, down), types)]
        assert np.array_equal(cpu.ffn_packed(x, *alone), y[g])


@pytest.mark.parametrize("activations", ["int8", "f32"])
@pytest.mark.parametrize("n_tokens", [1, 2])
def test_combined_experts_are_the_combine_of_each_expert_bit_for_bit(activations: str, n_tokens: int) -> None:
    rng = np.random.default_rng(4)
    (gate, up, down), _ = expert_weights(rng, 5, 256, 256)
    stacked = [cpu.repack_experts(raw, t, activations=activations)
               for raw, t in zip((gate, up, down), (T.Q4_K, T.Q4_K, T.Q6_K))]
    x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
    experts = [3, 0, 4]
    weights = rng.random((n_tokens, 3)).astype(np.float32)
    y = cpu.ffn_experts_sum(x, *stacked, experts, weights)
    parts = torch.from_numpy(cpu.ffn_experts(x, *stacked, experts)).transpose(0, 1)  # [n, G, D]
    assert np.array_equal(y, combine(parts, torch.from_numpy(weights), torch.float32).numpy())
    with pytest.raises(ValueError, match="weights must be"):
        cpu.ffn_experts_sum(x, *stacked, experts, weights[:, :2].copy())


def test_stacked_copy_is_each_experts_copy() -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks(T.Q8_0, 3 * 40 * 64 // 32, rng).reshape(3, 40, -1)
    for mode in cpu.ACTIVATIONS:
        stacked = cpu.repack_experts(raw, T.Q8_0, activations=mode)
        assert stacked.n_experts == 3
        for e in range(3):
            one = cpu.repack(raw[e], T.Q8_0, activations=mode)
            assert all(np.array_equal(a, b) for a, b in zip(stacked.expert(e).arrays, one.arrays))


def test_int8_inputs_are_checked() -> None:
    rng = np.random.default_rng(4)
    (gate, up, down), _ = expert_weights(rng, 2, 256, 256)
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="activations"):
        cpu.repack(gate[0], T.Q4_K, activations="int4")
    mixed = [cpu.repack(gate[0], T.Q4_K, activations="int8"), cpu.repack(up[0], T.Q4_K),
             cpu.repack(down[0], T.Q6_K, activations="int8")]
    with pytest.raises(ValueError, match="different activations"):
        cpu.ffn_packed(x, *mixed)
    stacked = [cpu.repack_experts(raw, t, activations="int8") for raw, t in zip((gate, up, down), types)]
    with pytest.raises(ValueError, match="experts must be"):
        cpu.ffn_experts(x, *stacked, [2])
    with pytest.raises(ValueError, match="do not fit"):
        cpu.ffn_experts(x[:, :128].copy(), *stacked, [0])
