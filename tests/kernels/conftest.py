import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import dequantize, get_format, random_blocks


class Case:
    """A random weight in raw GGUF rows, its float64 reference, and activations."""

    def __init__(self, qtype: T, n_rows: int, n_cols: int, n_tokens: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        fmt = get_format(qtype)
        self.qtype = qtype
        self.w_raw = random_blocks(qtype, n_rows * n_cols // fmt.block_size, rng).reshape(n_rows, -1)
        self.w = dequantize(self.w_raw, qtype, (n_rows, n_cols)).astype(np.float64)
        self.x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
        self.y = self.x.astype(np.float64) @ self.w.T

    def rel_error(self, y: np.ndarray) -> float:
        assert y.shape == self.y.shape and y.dtype == np.float32
        return float(np.abs(y - self.y).max() / np.abs(self.y).max())


@pytest.fixture
def case():
    return Case
