"""CPU kernels over GGUF-quantized weights (numba; all cores unless `set_threads` says otherwise).

Activations are float32 [n, K] (numpy or torch; a torch input gives a torch output). Weights are raw GGUF rows,
uint8 [N, row_bytes], e.g. one expert's slice of an mmap'd file.

Decode (a few tokens per expert), weights as they are in the file (the "mmap" tier):
    gemv(x, w_raw, ggml_type) -> [n, N]                         Q4_0, Q8_0, Q2_K-Q6_K, IQ4_XS, IQ2_XXS, IQ1_S

Decode with 8-bit activations (x rounded per group of 32, as llama.cpp does), in the file's layout (`raw_int8.py`):
    gemv_int8(x, w_raw, ggml_type) -> [n, N]                    Q8_0, Q2_K-Q6_K, IQ4_XS
    ffn_raw_int8(x, gate, up, down, types, experts, routing_weights=None) -> [G, n, D] (or [n, D])
                                                                 a layer's stacked raw experts, one call
    ffn_raw_int8_grouped(x, gate, up, down, types, experts, counts) -> [sum(counts), D]
                                                                 prefill: each expert on its own rows, one call

Decode at memory speed, after a one-time copy into a lane-interleaved layout (the "pinned RAM" tier):
    repack(w_raw, ggml_type, lanes=64, activations="f32") -> PackedWeight     same types
    gemv_packed(x, packed) -> [n, N]
    ffn_packed(x, gate, up, down) -> [n, D]                      one expert's whole FFN, checked once
    repack_experts(raw [E, N, row_bytes], ggml_type, activations) -> PackedExperts   a layer's experts, stacked
    ffn_experts(x, gate, up, down, experts) -> [G, n, D]         several experts of a layer on the same tokens
    ffn_experts_sum(x, gate, up, down, experts, weights) -> [n, D]   the same, combined (as layers.moe.combine)
activations="f32" keeps x in float32 (results match dequantize + matmul to float32 rounding); "int8" rounds x to 8
bits per group of 32 (as llama.cpp does) and sums in integers (`int8.py`): several times less compute per weight,
results within about 1e-2 relative of the exact ones, and `ffn_experts` runs all experts in one call.

Grouped-query attention at decode (one token, float32, `attention.py`): q/k norm, rope, cache write, attention.
    gqa_decode(qkv, n_heads, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pos, scale) -> [H * D]

Multi-head latent attention at decode (one token, float32, absorbed form, `mla.py`): latent norm, rope, cache write,
attention over the cached latents.
    mla_decode(q, kv, n_heads, kv_norm, eps, cos, sin, w_kv_b, latent_cache, pe_cache, pos, scale) -> [H * V]
    mla_decode_raw(q, kv, n_heads, kv_norm, eps, cos, sin, k_b, v_b, ggml_type, latent_cache, pe_cache, pos,
                   scale) -> [H * V]                         wkv_b as GGUF's attn_k_b / attn_v_b blocks
    MLABlock(wq_kv_a, ..., wo)(x, cos, sin, latent_cache, pe_cache, pos, scale) -> [1, 1, D]
                                                             the whole attention block's step (`blocks.py`)
    GQABlock(wqkv, ..., wo)(x, cos, sin, k_cache, v_cache, pos, scale) -> [1, 1, D]     the same for GQA
    AttentionHalf(block, attn_norm, eps, ffn_norm, eps)(x, pending, cos, sin, cache_a, cache_b, pos, scale)
                        -> (x + pending + attention, its ffn norm)  a decoder block's attention half in one call
    MoEBlock(router, ..., gate, up, down, types, shared)(x) -> ([1, D], chosen experts)
                                                             a MoE layer's step for one token

RMSNorm of a few float32 rows, optionally after adding a residual (`norm.py`), in one call.
    rms_norm(x, weight, eps, residual=None) -> (x + residual, normalised)

Top-k routing of a few tokens (float32, `router.py`): logits, softmax or sigmoid, the group limit and bias of
DeepSeek's routers, top k and weights in one call.
    route_topk(x, router, top_k, renorm, scaling, *, sigmoid, bias, n_group, topk_group, top2_groups, masked)
    route_softmax(x, router, top_k, renorm, scaling) -> (ids [n, K], weights [n, K])

Prefill (many tokens per expert): float32 tiles of W and torch.matmul; any type `hybridmoe.quant` knows.
    matmul(x, w_raw, ggml_type) -> torch.Tensor [T, N]
    dequantize(w_raw, ggml_type, n_cols) -> float32 [N, n_cols]

Optional, when llama-cpp-python is installed: ggml's own dot products, which quantize the activations to 8 bits.
    ggml.available() -> bool;  ggml.gemv(x, w_raw, ggml_type) -> [n, N]

    decode_route(ggml_type) -> str                               how experts of that type decode, in words
    set_threads(n), get_threads()                                threads for all of the above (per calling thread)

A layer's decode experts as a C-callable task, for a CUDA graph's host node (`host_task.py`, imported on use).

Importing this package lets numba use 512-bit vectors on AVX-512 CPUs (`target.py`); NUMBA_CPU_FEATURES overrides.
It also keeps the compiled kernels in a cache named by a hash of their sources (~/.cache/hybridmoe/numba/, or under
NUMBA_CACHE_DIR), so an upgrade never runs code compiled from older sources.
"""
from .target import use_full_vector_width, use_source_keyed_cache

use_full_vector_width()
use_source_keyed_cache()

from .api import (GEMV_TYPES, RAW_INT8_TYPES, decode_route, dequantize, ffn_experts, ffn_experts_sum,  # noqa: E402
                  ffn_packed, ffn_raw_int8, ffn_raw_int8_grouped, gemv, gemv_int8, gemv_packed, get_threads,
                  gqa_decode, matmul, mla_decode, mla_decode_raw, repack, repack_experts, rms_norm, route_softmax,
                  route_topk, set_threads)
from .block_api import AttentionHalf, GQABlock, MLABlock, MoEBlock  # noqa: E402
from .repack import ACTIVATIONS, PACKED_TYPES, PackedExperts, PackedWeight  # noqa: E402

__all__ = ["ACTIVATIONS", "AttentionHalf", "GEMV_TYPES", "GQABlock", "MLABlock", "MoEBlock", "PACKED_TYPES",
           "RAW_INT8_TYPES", "PackedExperts", "PackedWeight",
           "decode_route", "dequantize", "ffn_experts", "ffn_experts_sum", "ffn_packed", "ffn_raw_int8",
           "ffn_raw_int8_grouped", "gemv", "gemv_int8", "gemv_packed", "get_threads", "gqa_decode", "matmul",
           "mla_decode", "mla_decode_raw", "repack", "repack_experts", "rms_norm", "route_softmax", "route_topk",
           "set_threads"]
