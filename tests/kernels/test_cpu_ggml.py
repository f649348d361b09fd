"""The optional ggml route; skipped when llama-cpp-python is not installed."""
import pytest
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels.cpu import ggml

pytestmark = pytest.mark.skipif(not ggml.available(), reason="llama_cpp (llama-cpp-python) is not installed")

# the activations are rounded to 8 bits, so this is far looser than the float32 path
TOL = 3e-2


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_ggml_gemv(case, qtype: T) -> None:
    c = case(qtype, 40, 512, 2)
    assert c.rel_error(ggml.gemv(c.x, c.w_raw, qtype)) < TOL


def test_ggml_refuses_other_types(case) -> None:
    c = case(T.IQ4_XS, 8, 256, 1)
    with pytest.raises(ValueError, match="IQ4_XS"):
        ggml.gemv(c.x, c.w_raw, T.IQ4_XS)
