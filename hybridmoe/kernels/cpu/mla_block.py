"""One decode step of a DeepSeek attention block on the CPU in one call: x -> wq_a and wkv_a (stacked, 8-bit
activations) -> q_norm -> wq_b -> absorbed MLA over the cache -> wo. The same kernels, in the same order, as the
layers call them one by one (so the same bits); what goes is the Python and torch between them, about a fifth of a
DeepSeek-shaped decode step on two cores.

Weights are the repacked 8-bit-activation tiles of `repack.py` (q, s, d, each [1, tiles, ...]: one "expert") and
GGUF's attn_k_b / attn_v_b blocks; buffers are allocated here (a few KB).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .int8 import LANES, gemv
from .mla import mla_decode_raw
from .norm import add_rms_norm

f32 = np.float32


@njit(cache=True)
def mla_block(x, a_kind, a_q, a_s, a_d, q_rank, q_norm, q_eps, b_kind, b_q, b_s, b_d, n_heads, qk, kv_norm, kv_eps,
              cos, sin, raw_kind, k_b, v_b, latent_cache, pe_cache, pos, scale, w32, o_kind, o_q, o_s, o_d, out):
    """x f32 [1, D]; a_*: wq_a and wkv_a stacked (q_rank + R + P rows); q_norm f32 [q_rank]; b_*: wq_b (n_heads *
    qk rows, qk = N + P); kv_norm f32 [R]; cos, sin f32 [P/2]; raw_kind, k_b, v_b, the caches, pos, scale, w32: as
    mla_decode_raw takes them; o_*: wo (D rows) -> out f32 [1, D]."""
    first = np.zeros(1, dtype=np.int64)  # the one "expert" of each stacked weight
    no_rows = np.empty((0, 0), dtype=f32)
    rank, rope = kv_norm.size, pe_cache.shape[1]
    ya = np.empty((1, 1, a_q.shape[1] * LANES), dtype=f32)
    gemv(a_kind, x, a_q, a_s, a_d, first, ya)
    q_a = np.ascontiguousarray(ya[0, :, :q_rank])
    kv = np.ascontiguousarray(ya[0, 0, q_rank:q_rank + rank + rope])
    q_n = np.empty_like(q_a)
    add_rms_norm(q_a, no_rows, q_norm, q_eps, no_rows, q_n)
    yb = np.empty((1, 1, b_q.shape[1] * LANES), dtype=f32)
    gemv(b_kind, q_n, b_q, b_s, b_d, first, yb)
    q = np.ascontiguousarray(yb[0, 0, :n_heads * qk]).reshape(n_heads, qk)
    o = np.empty((n_heads, v_b.shape[1]), dtype=f32)
    mla_decode_raw(q, kv, kv_norm, kv_eps, cos, sin, raw_kind, k_b, v_b, latent_cache, pe_cache, pos, scale, w32, o)
    yo = np.empty((1, 1, o_q.shape[1] * LANES), dtype=f32)
    gemv(o_kind, o.reshape(1, -1), o_q, o_s, o_d, first, yo)
    out[0, :] = yo[0, 0, :out.shape[1]]
