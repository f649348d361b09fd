"""A layer's halves of one CPU decode step, each in one call: the attention block (DeepSeek's MLA, or grouped-query
attention: projections, norms, rope, the cache, attention, the output projection), with the residual adds and norms
around it (`mla_half`, `gqa_half`), and the MoE layer (router, routed experts, shared expert). The same kernels,
in the same order, on the same inputs, as the layers call them one by one (so the same bits); what goes is the
Python and torch between them, about a fifth of a DeepSeek-shaped decode step on two cores.

Projections are the repacked 8-bit-activation tiles of `repack.py` (q, s, d, each [1, tiles, ...]: one "expert"),
MLA's wkv_b GGUF's attn_k_b / attn_v_b blocks, routed experts the file's bytes (`raw_int8.py`); buffers are
allocated here (a few KB).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import int8, raw_int8
from .attention import gqa_decode
from .int8 import LANES, gemv
from .mla import mla_decode_raw
from .norm import add_rms_norm
from .router import route

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


@njit(cache=True)
def gqa_block(x, a_kind, a_q, a_s, a_d, n_heads, qkv_width, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pos,
              scale, o_kind, o_q, o_s, o_d, out):
    """x f32 [1, D]; a_*: wq, wk and wv stacked (qkv_width = (H + 2 Hk) * head dim rows); q_norm, k_norm f32
    [head dim] or empty; cos, sin, the caches, pos, scale: as attention.gqa_decode takes them; o_*: wo (D rows) ->
    out f32 [1, D]."""
    first = np.zeros(1, dtype=np.int64)
    ya = np.empty((1, 1, a_q.shape[1] * LANES), dtype=f32)
    gemv(a_kind, x, a_q, a_s, a_d, first, ya)
    qkv = np.ascontiguousarray(ya[0, 0, :qkv_width])
    o = np.empty(n_heads * k_cache.shape[2], dtype=f32)
    gqa_decode(qkv, n_heads, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pos, scale, o)
    yo = np.empty((1, 1, o_q.shape[1] * LANES), dtype=f32)
    gemv(o_kind, o.reshape(1, -1), o_q, o_s, o_d, first, yo)
    out[0, :] = yo[0, 0, :out.shape[1]]


@njit(cache=True)
def moe_block(x, router, bias, sigmoid, n_group, topk_group, top2_groups, fill, renorm, scaling, kinds, gate, up,
              down, ids, weights, out):
    """x f32 [1, D]; router f32 [E, D] and the routing settings as `router.route` takes them; kinds, gate, up, down:
    the routed experts as `raw_int8.ffn` takes them -> ids int64 [1, K], weights f32 [1, K], out f32 [1, D]."""
    route(x, router, bias, sigmoid, n_group, topk_group, top2_groups, fill, renorm, scaling, ids, weights)
    y = np.empty((ids.shape[1], 1, out.shape[1]), dtype=f32)
    raw_int8.ffn(kinds, x, gate, up, down, ids[0], y, weights, out)


@njit(cache=True)
def moe_block_shared(x, router, bias, sigmoid, n_group, topk_group, top2_groups, fill, renorm, scaling, kinds, gate,
                     up, down, s_kinds, s_inter, s_width, sgq, sgs, sgd, suq, sus, sud, sdq, sds, sdd, ids, weights,
                     out):
    """moe_block, then the shared expert added: s_*, its stacked 8-bit tiles as `int8.ffn` takes them (s_width: the
    padded width of its output)."""
    moe_block(x, router, bias, sigmoid, n_group, topk_group, top2_groups, fill, renorm, scaling, kinds, gate, up,
              down, ids, weights, out)
    no_rows = np.empty((0, 0), dtype=f32)
    ys = np.empty((1, 1, s_width), dtype=f32)
    int8.ffn(s_kinds, x, s_inter, sgq, sgs, sgd, suq, sus, sud, sdq, sds, sdd, np.zeros(1, dtype=np.int64), ys,
             no_rows, no_rows)
    for j in range(out.shape[1]):
        out[0, j] += ys[0, 0, j]


@njit(cache=True, inline="always")
def _norm_in(x, pending, w, eps, x_out, normed):
    """x_out = x + pending (x itself where pending is empty), normed = RMSNorm(x_out) * w (`RMSNorm.add`'s bits)."""
    if pending.size == 0:
        x_out[:] = x
    add_rms_norm(x, pending, w, eps, x_out, normed)


@njit(cache=True)
def mla_half(x, pending, attn_w, attn_eps, ffn_w, ffn_eps, x_out, h, *block):
    """A block's attention half of one decode token (`Block.attend`): x f32 [1, D] plus the previous block's pending
    output [1, D] (empty: none) -> x_out, normed by attn_w into mla_block (block: its arguments between x and
    out), whose output is added to x_out and normed by ffn_w into h (the feed-forward half's input)."""
    normed = np.empty_like(x)
    _norm_in(x, pending, attn_w, attn_eps, x_out, normed)
    a = np.empty_like(x)
    mla_block(normed, *block, a)
    add_rms_norm(x_out, a, ffn_w, ffn_eps, x_out, h)


@njit(cache=True)
def gqa_half(x, pending, attn_w, attn_eps, ffn_w, ffn_eps, x_out, h, *block):
    """mla_half for gqa_block."""
    normed = np.empty_like(x)
    _norm_in(x, pending, attn_w, attn_eps, x_out, normed)
    a = np.empty_like(x)
    gqa_block(normed, *block, a)
    add_rms_norm(x_out, a, ffn_w, ffn_eps, x_out, h)
