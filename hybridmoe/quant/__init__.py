"""Block quantization formats of GGUF files, with numpy reference dequantization.

    get_format(ggml_type) -> type[BlockFormat]     block_size, type_size, dequantize_blocks(uint8 [n, type_size])
    dequantize(raw, ggml_type, shape) -> float32 array of `shape`

Each format is a class that registers itself by its GGML type: `class Q4_K(BlockFormat, qtype=...)`.
"""
from . import iquants, kquants, simple  # noqa: F401  (importing registers the formats)
from .base import BlockFormat, as_qtype, dequantize, get_format, random_blocks, supported_names
from .kquants import unpack_scale_min_k4

__all__ = ["BlockFormat", "as_qtype", "dequantize", "get_format", "random_blocks", "supported_names",
           "unpack_scale_min_k4"]
