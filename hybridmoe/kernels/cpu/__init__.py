"""CPU kernels over GGUF-quantized weights (numba; all cores unless `set_threads` says otherwise).

Activations are float32 [n, K] (numpy or torch; a torch input gives a torch output). Weights are raw GGUF rows,
uint8 [N, row_bytes], e.g. one expert's slice of an mmap'd file.

Decode (a few tokens per expert), weights as they are in the file (the "mmap" tier):
    gemv(x, w_raw, ggml_type) -> [n, N]                         Q4_0, Q8_0, Q4_K, Q5_K, Q6_K

Decode at memory speed, after a one-time copy into a lane-interleaved layout (the "pinned RAM" tier):
    repack(w_raw, ggml_type, lanes=64) -> PackedWeight          same types
    gemv_packed(x, packed) -> [n, N]
    ffn_packed(x, gate, up, down) -> [n, D]                      one expert's whole FFN, checked once

Prefill (many tokens per expert): float32 tiles of W and torch.matmul; any type `hybridmoe.quant` knows.
    matmul(x, w_raw, ggml_type) -> torch.Tensor [T, N]
    dequantize(w_raw, ggml_type, n_cols) -> float32 [N, n_cols]

Optional, when llama-cpp-python is installed: ggml's own dot products, which quantize the activations to 8 bits.
    ggml.available() -> bool;  ggml.gemv(x, w_raw, ggml_type) -> [n, N]

    set_threads(n)                                               threads for all of the above

Importing this package lets numba use 512-bit vectors on AVX-512 CPUs (`target.py`); NUMBA_CPU_FEATURES overrides.
"""
from .target import use_full_vector_width

use_full_vector_width()

from .api import GEMV_TYPES, dequantize, ffn_packed, gemv, gemv_packed, matmul, repack, set_threads  # noqa: E402
from .repack import PACKED_TYPES, PackedWeight  # noqa: E402

__all__ = ["GEMV_TYPES", "PACKED_TYPES", "PackedWeight", "dequantize", "ffn_packed", "gemv", "gemv_packed", "matmul", "repack",
           "set_threads"]
