"""Parity of the CPU decode kernels with `hybridmoe.quant` dequantization followed by a float64 matmul."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu

TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
RAW_ONLY = [T.Q2_K, T.Q3_K, T.IQ4_XS, T.IQ2_XXS, T.IQ1_S]  # in DeepSeek-R1's popular quants; never repacked
TOL = 1e-5


@pytest.mark.parametrize("qtype", TYPES + RAW_ONLY, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 2, 4])
def test_raw_gemv(case, qtype: T, n_tokens: int) -> None:
    c = case(qtype, 72, 512, n_tokens)
    assert c.rel_error(cpu.gemv(c.x, c.w_raw, qtype)) < TOL


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("lanes", [16, 64])
def test_packed_gemv(case, qtype: T, n_tokens: int, lanes: int) -> None:
    c = case(qtype, 72, 768, n_tokens)  # 72 rows: the last tile is padded
    packed = cpu.repack(c.w_raw, qtype, lanes=lanes)
    assert (packed.n_rows, packed.n_cols, packed.lanes) == (72, 768, lanes)
    assert c.rel_error(cpu.gemv_packed(c.x, packed)) < TOL


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0], ids=lambda q: q.name)
def test_row_shorter_than_a_super_block(case, qtype: T) -> None:
    c = case(qtype, 20, 96, 2)
    assert c.rel_error(cpu.gemv(c.x, c.w_raw, qtype)) < TOL
    assert c.rel_error(cpu.gemv_packed(c.x, cpu.repack(c.w_raw, qtype))) < TOL


def test_torch_in_torch_out(case) -> None:
    c = case(T.Q4_K, 64, 256, 1)
    x = torch.from_numpy(c.x)
    y_raw = cpu.gemv(x, c.w_raw, T.Q4_K)
    y_packed = cpu.gemv_packed(x, cpu.repack(c.w_raw, T.Q4_K))
    assert isinstance(y_raw, torch.Tensor) and isinstance(y_packed, torch.Tensor)
    assert c.rel_error(y_raw.numpy()) < TOL and c.rel_error(y_packed.numpy()) < TOL


@pytest.mark.parametrize("qtype", TYPES + RAW_ONLY, ids=lambda q: q.name)
def test_dequantize_is_bit_exact(case, qtype: T) -> None:
    c = case(qtype, 24, 512, 1)
    assert np.array_equal(cpu.dequantize(c.w_raw, qtype, 512), c.w.astype(np.float32))


@pytest.mark.parametrize("qtype", TYPES + RAW_ONLY, ids=lambda q: q.name)
def test_prefill_matmul(case, qtype: T) -> None:
    c = case(qtype, 40, 512, 9)
    y = cpu.matmul(torch.from_numpy(c.x), c.w_raw, qtype)
    assert isinstance(y, torch.Tensor)
    assert c.rel_error(y.numpy()) < TOL


def test_prefill_matmul_spans_several_tiles(case) -> None:
    c = case(T.Q8_0, 1100, 64, 5)
    assert c.rel_error(cpu.matmul(c.x, c.w_raw, T.Q8_0).numpy()) < TOL
