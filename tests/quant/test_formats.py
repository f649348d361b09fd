"""Our numpy dequantization against the `gguf` package's reference, bit for bit."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from hybridmoe.quant import dequantize, get_format, random_blocks, supported_names

OWN_CODE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL",
            "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
FALLBACK = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
ROUND_TRIP = ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _gguf_reference(blocks: np.ndarray, qtype: T) -> np.ndarray:
    return gguf_quants.dequantize(blocks, qtype).reshape(blocks.shape[0], -1).astype(np.float32)


@pytest.mark.parametrize("name", OWN_CODE + FALLBACK)
def test_bit_exact_against_gguf(name: str) -> None:
    qtype = T[name]
    fmt = get_format(qtype)
    rng = np.random.default_rng(int(qtype))
    blocks = random_blocks(qtype, 96, rng)
    ours = fmt.dequantize_blocks(blocks)
    assert ours.dtype == np.float32 and ours.shape == (96, fmt.block_size)
    assert np.array_equal(ours, _gguf_reference(blocks, qtype), equal_nan=True)


@pytest.mark.parametrize("name", OWN_CODE)
def test_scales_with_extreme_f16(name: str) -> None:
    qtype = T[name]
    rng = np.random.default_rng(1000 + int(qtype))
    blocks = random_blocks(qtype, 64, rng, scale=60000.0)
    assert np.array_equal(get_format(qtype).dequantize_blocks(blocks), _gguf_reference(blocks, qtype), equal_nan=True)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_through_gguf_quantize(name: str) -> None:
    qtype = T[name]
    rng = np.random.default_rng(7)
    data = rng.standard_normal((8, 512)).astype(np.float32)
    raw = gguf_quants.quantize(data, qtype).view(np.uint8)
    ours = dequantize(raw, qtype, data.shape)
    assert np.array_equal(ours, gguf_quants.dequantize(raw, qtype))
    # the quantization error is bounded by about one step of the coarsest format
    assert np.abs(ours - data).max() < 0.5


def test_dequantize_whole_tensor_shape() -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks(T.Q4_K, 3 * 4, rng).reshape(3, 4 * 144)
    out = dequantize(raw, T.Q4_K, (3, 1024))
    assert out.shape == (3, 1024)
    assert np.array_equal(out, get_format(T.Q4_K).dequantize_blocks(raw.reshape(-1, 144)).reshape(3, 1024))


def test_every_listed_type_is_registered() -> None:
    assert sorted(OWN_CODE + FALLBACK) == supported_names()


@pytest.mark.parametrize("qtype", [T.Q8_K, T.Q8_1, int(T.Q8_K)])
def test_unsupported_type_is_named(qtype: T | int) -> None:
    with pytest.raises(ValueError, match=T(qtype).name):
        get_format(qtype)


def test_unknown_type_id() -> None:
    with pytest.raises(ValueError, match="9999"):
        get_format(9999)


def test_dequantize_checks_sizes() -> None:
    raw = np.zeros(144, dtype=np.uint8)
    with pytest.raises(ValueError, match="block size"):
        dequantize(raw, T.Q4_K, (1, 100))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, T.Q4_K, (2, 256))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(raw.view(np.int8), T.Q4_K, (1, 256))
    with pytest.raises(TypeError):
        get_format(T.Q4_K)()
