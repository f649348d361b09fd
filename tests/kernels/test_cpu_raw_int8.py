"""8-bit-activation kernels over the GGUF byte layout (the mmap tier): the arithmetic of the repacked 8-bit kernels
(rounded(x) @ W.T, exact on activations that 8 bits represent), read from the file's rows in place."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu
from hybridmoe.layers.moe import combine

from test_cpu_int8 import expert_weights, ffn_reference, int8_exact, rounded

TYPES = [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_XS]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_raw_int8_gemv_is_exact_on_8_bit_activations(case, qtype: T, n_tokens: int) -> None:
    c = case(qtype, 40, 768, n_tokens)  # 768: 24 Q8_0 blocks (12 pairs), 3 blocks of the 256-element types
    x = int8_exact(np.random.default_rng(1), n_tokens, 768)
    want = x.astype(np.float64) @ c.w.T
    got = cpu.gemv_int8(x, c.w_raw, qtype)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("qtype,k_dim", [(T.Q8_0, 96), (T.Q8_0, 2048), (T.Q4_K, 2048), (T.Q5_K, 512), (T.Q6_K, 512)],
                         ids=["q8_0-odd-blocks", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_raw_int8_gemv_agrees_with_the_repacked_kernel(case, qtype: T, k_dim: int) -> None:
    c = case(qtype, 33, k_dim, 2)
    got = cpu.gemv_int8(torch.from_numpy(c.x), c.w_raw, qtype)
    assert isinstance(got, torch.Tensor)
    want = cpu.gemv_packed(c.x, cpu.repack(c.w_raw, qtype, activations="int8"))
    assert np.abs(got.numpy() - want).max() / np.abs(want).max() < 1e-5
    assert c.rel_error(got.numpy()) < 1e-2  # and near the exact product


@pytest.mark.parametrize("types,inter", [((T.Q4_K, T.Q4_K, T.Q6_K), 256), ((T.Q8_0, T.Q8_0, T.Q8_0), 96),
                                         ((T.Q2_K, T.Q2_K, T.Q3_K), 256), ((T.IQ4_XS, T.IQ4_XS, T.Q4_K), 256)],
                         ids=["q4_k_m", "q8_0", "q2_k", "iq4_xs"])
@pytest.mark.parametrize("n_tokens", [1, 2])
def test_raw_int8_experts_match_the_repacked_ones_and_the_reference(types, inter: int, n_tokens: int) -> None:
    rng = np.random.default_rng(0)
    raws, floats = expert_weights(rng, 6, 256, inter, types)
    x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
    experts = [4, 0, 5]
    y = cpu.ffn_raw_int8(x, *raws, types, experts)
    assert y.shape == (3, n_tokens, 256) and y.dtype == np.float32
    if all(t in cpu.PACKED_TYPES for t in types):
        stacked = [cpu.repack_experts(raw, t, activations="int8") for raw, t in zip(raws, types)]
        packed = cpu.ffn_experts(x, *stacked, experts)
        assert np.abs(y - packed).max() / np.abs(packed).max() < 1e-5
    for g, e in enumerate(experts):
        want = ffn_reference(x, *(f[e] for f in floats), rounded)  # the kernels' arithmetic, in float64
        assert np.abs(y[g] - want).max() / np.abs(want).max() < 1e-4
    weights = rng.random((n_tokens, 3)).astype(np.float32)
    summed = cpu.ffn_raw_int8(x, *raws, types, experts, weights)
    parts = torch.from_numpy(y).transpose(0, 1)
    assert np.array_equal(summed, combine(parts, torch.from_numpy(weights), torch.float32).numpy())


def test_raw_int8_inputs_are_checked() -> None:
    rng = np.random.default_rng(2)
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    (gate, up, down), _ = expert_weights(rng, 2, 256, 256, types)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="Q4_0"):
        cpu.gemv_int8(x, gate[0], T.Q4_0)
    with pytest.raises(ValueError, match="K = 512"):
        cpu.gemv_int8(np.zeros((1, 512), np.float32), gate[0], T.Q4_K)
    with pytest.raises(ValueError, match="Q4_0"):
        cpu.ffn_raw_int8(x, gate, up, down, (T.Q4_K, T.Q4_0, T.Q6_K), [0])
    with pytest.raises(ValueError, match="down: rows"):
        cpu.ffn_raw_int8(x, gate, up, down, (T.Q4_K, T.Q4_K, T.Q4_K), [0])
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        cpu.ffn_raw_int8(x, gate[:, :, ::2], up, down, types, [0])
    with pytest.raises(ValueError, match="expert shapes"):
        cpu.ffn_raw_int8(x, gate, up[:, :128].copy(), down, types, [0])
    with pytest.raises(ValueError, match="ids below 2"):
        cpu.ffn_raw_int8(x, gate, up, down, types, [2])
    with pytest.raises(ValueError, match="weights must be"):
        cpu.ffn_raw_int8(x, gate, up, down, types, [0, 1], np.ones((1, 3), np.float32))


@pytest.mark.parametrize("qtype,k_dim", [(T.Q4_K, 768), (T.Q6_K, 512), (T.Q8_0, 96), (T.Q2_K, 512), (T.Q3_K, 256),
                                         (T.IQ4_XS, 512)],
                         ids=lambda v: str(v))
def test_raw_int8_tokens_together_are_each_token_alone_bit_for_bit(case, qtype: T, k_dim: int) -> None:
    """Several tokens share one pass over a row (its scales unpacked once), with each token's own arithmetic."""
    c = case(qtype, 40, k_dim, 5)
    together = cpu.gemv_int8(c.x, c.w_raw, qtype)
    alone = np.concatenate([cpu.gemv_int8(c.x[t:t + 1], c.w_raw, qtype) for t in range(5)])
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("types,inter", [((T.Q4_K, T.Q4_K, T.Q6_K), 256), ((T.Q8_0, T.Q8_0, T.Q8_0), 96),
                                         ((T.Q6_K, T.Q6_K, T.Q8_0), 512), ((T.Q2_K, T.Q2_K, T.Q3_K), 256),
                                         ((T.Q5_K, T.Q5_K, T.Q4_K), 256)],
                         ids=["q4_k_m", "q8_0", "q6_k", "q2_k", "q5_k"])
def test_grouped_prefill_computes_each_experts_rows(types, inter: int) -> None:
    """Experts with many tokens take the gathered tiles (Q8_0, Q4_K, Q6_K), those with few the decode kernels'
    pass; either way rounded(x) @ W.T, as the decode kernel gives it to float32 rounding."""
    rng = np.random.default_rng(3)
    raws, floats = expert_weights(rng, 6, 256, inter, types)
    experts, counts = [4, 0, 2, 5, 1], [3, 1, 0, 21, 5]  # an expert with no tokens is skipped; 21: a partial tile
    x = rng.standard_normal((sum(counts), 256)).astype(np.float32)
    y = cpu.ffn_raw_int8_grouped(x, *raws, types, experts, counts)
    assert y.shape == x.shape and y.dtype == np.float32
    at = 0
    for e, n in zip(experts, counts):
        if n:
            got = y[at:at + n]
            alone = cpu.ffn_raw_int8_grouped(x[at:at + n], *raws, types, [e], [n])
            assert np.array_equal(got, alone)  # the other experts of the call change nothing
            decode = np.concatenate([cpu.ffn_raw_int8(x[t:t + 1], *raws, types, [e])[0] for t in range(at, at + n)])
            assert np.abs(got - decode).max() / np.abs(decode).max() < 1e-5
            want = ffn_reference(x[at:at + n], *(f[e] for f in floats), rounded)
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        at += n
    with pytest.raises(ValueError, match="token counts"):
        cpu.ffn_raw_int8_grouped(x, *raws, types, experts, [3, 1, 0, 21, 4])


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K])
def test_nan_and_infinite_activations_stay_visible(qtype: T) -> None:
    """A NaN or infinite input makes its token's outputs NaN (rounding to 8 bits dropped a NaN: the group's scale
    ignored it and the integer came out finite, so a model with NaN weights gave plausible logits)."""
    from hybridmoe.quant import random_blocks
    k_dim, rows = 512, 48
    rng = np.random.default_rng(3)
    w = random_blocks(qtype, rows * k_dim // 256 if qtype != T.Q8_0 else rows * k_dim // 32, rng).reshape(rows, -1)
    x = rng.standard_normal((3, k_dim)).astype(np.float32)
    clean = cpu.gemv_int8(x, w, qtype)
    x[0, 100], x[1, 300] = np.nan, np.inf
    y = cpu.gemv_int8(x, w, qtype)
    assert np.isnan(y[:2]).all()
    assert np.array_equal(y[2], clean[2])
