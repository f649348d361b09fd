"""The kernel wrappers refuse bad inputs with a ValueError that names the problem."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu

W = np.zeros((8, 144), dtype=np.uint8)  # 8 rows of one Q4_K block
X = np.zeros((1, 256), dtype=np.float32)


@pytest.mark.parametrize("x, message", [
    (np.zeros((1, 256), dtype=np.float64), "float32"),
    (np.zeros(256, dtype=np.float32), "shape"),
    (np.zeros((0, 256), dtype=np.float32), "shape"),
    (np.zeros((1, 512), dtype=np.float32)[:, ::2], "contiguous"),
    (np.zeros((1, 512), dtype=np.float32), "bytes"),
    ([[0.0] * 256], "numpy array or torch tensor"),
])
def test_bad_activations(x, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cpu.gemv(x, W, T.Q4_K)


@pytest.mark.parametrize("w, message", [
    (W.view(np.int8), "uint8"),
    (W.reshape(-1), "N, row_bytes"),
    (np.zeros((16, 144), dtype=np.uint8)[::2], "contiguous"),
    (np.zeros((8, 140), dtype=np.uint8), "bytes"),
])
def test_bad_weights(w, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cpu.gemv(X, w, T.Q4_K)


def test_type_without_kernel_is_named() -> None:
    with pytest.raises(ValueError, match="IQ3_XXS"):
        cpu.gemv(X, np.zeros((8, 98), dtype=np.uint8), T.IQ3_XXS)
    with pytest.raises(ValueError, match="IQ4_XS"):
        cpu.repack(np.zeros((8, 136), dtype=np.uint8), T.IQ4_XS)


def test_k_not_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="block size"):
        cpu.gemv(np.zeros((1, 100), dtype=np.float32), W, T.Q4_K)


def test_packed_weight_and_activations_must_agree() -> None:
    packed = cpu.repack(W, T.Q4_K)
    with pytest.raises(ValueError, match="columns"):
        cpu.gemv_packed(np.zeros((1, 512), dtype=np.float32), packed)
    with pytest.raises(ValueError, match="float32"):
        cpu.gemv_packed(torch.zeros((1, 256), dtype=torch.float64), packed)
