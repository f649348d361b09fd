"""One decode token's MoE layer on the CPU in one call: the router, the chosen routed experts read from the file's
bytes with 8-bit activations and their weighted sum (`raw_int8.ffn`), the shared expert's repacked 8-bit tiles
(`int8.ffn`), and the sum of the two. The same kernels in the same order, on the same inputs, as the layers call
them one by one (so the same bits); what goes is the Python and torch between them.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import int8, raw_int8
from .router import route

f32 = np.float32


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
