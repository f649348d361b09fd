"""MoE routing in one launch: scores, group-limited choice, top-k and weight scaling, one program per token.

`layers.moe.route` in eager torch is 6 kernels for softmax top-k routing and about 17 for DeepSeek-V3's sigmoid
routing with a correction bias and group limits; a decode step runs it once per MoE layer (and once more per layer
for the prefetcher's prediction). Same arithmetic in float32; the choices are the same except between exactly equal
scores (torch does not define that order either), the weights agree to float32 rounding.

`router_logits` makes the float32 logits it reads, for a decode step's few tokens, in one launch too: eagerly that
is a cast of the hidden state to float32 and a cuBLAS matrix-vector product (two or three kernels). The sums run in
another order than cuBLAS's, so the logits agree to float32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks


@triton.jit
def route_kernel(logits, bias, ids_out, w_out, E, scaling,
                 K: tl.constexpr, KB: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GROUP: tl.constexpr,
                 GRP: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUPED: tl.constexpr, TOP2: tl.constexpr, FILL_ZERO: tl.constexpr, NORM: tl.constexpr,
                 SCALE: tl.constexpr):
    """Program n: logits[n, :E] -> ids_out[n, :K] (int64), w_out[n, :K] (float32). The experts are laid out as
    [GP groups, GRP per group] (padded to powers of two), expert g * GROUP + j at [g, j]."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)[:, None]
    j = tl.arange(0, GRP)[None, :]
    valid = (g < G) & (j < GROUP)
    e = g * GROUP + j
    x = tl.load(logits + n * E + e, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        z = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = z / tl.sum(tl.sum(z, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUPED:
        first = tl.max(choice, axis=1)  # [GP]
        if TOP2:  # a group's score: its two best experts' sum
            at = tl.argmax(choice, axis=1)
            second = tl.max(tl.where(j == at[:, None], float("-inf"), choice), axis=1)
            group_score = first + second
        else:
            group_score = first
        gs = tl.where(tl.arange(0, GP) < G, group_score, float("-inf"))
        keep = tl.zeros([GP], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gs, axis=0)
            keep = keep | (tl.arange(0, GP) == best)
            gs = tl.where(tl.arange(0, GP) == best, float("-inf"), gs)
        fill = 0.0 if FILL_ZERO else float("-inf")
        choice = tl.where(keep[:, None] & valid, choice, tl.where(valid, fill, float("-inf")))
    flat_choice = tl.reshape(choice, [GP * GRP])
    flat_scores = tl.reshape(tl.where(valid, scores, 0.0), [GP * GRP])
    flat_e = tl.reshape(e, [GP * GRP])
    slots = tl.arange(0, GP * GRP)
    k = tl.arange(0, KB)
    ids = tl.zeros([KB], dtype=tl.int64)
    w = tl.zeros([KB], dtype=tl.float32)
    for t in tl.static_range(K):
        pick = tl.argmax(flat_choice, axis=0)
        hit = slots == pick
        ids = tl.where(k == t, tl.sum(tl.where(hit, flat_e, 0), axis=0).to(tl.int64), ids)
        w = tl.where(k == t, tl.sum(tl.where(hit, flat_scores, 0.0), axis=0), w)
        flat_choice = tl.where(hit, float("-inf"), flat_choice)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    if SCALE:
        w = w * scaling
    tl.store(ids_out + n * K + k, ids, mask=k < K)
    tl.store(w_out + n * K + k, w, mask=k < K)


def route(logits: torch.Tensor, spec, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As layers.moe.route: logits [N, E] -> (ids [N, K] int64, weights [N, K] float32)."""
    device = checks.device_of("logits", logits)
    if logits.dim() != 2 or logits.shape[1] != spec.n_experts:
        raise ValueError(f"logits must be [n_tokens, {spec.n_experts}], got {tuple(logits.shape)}")
    N, E = logits.shape
    K = spec.top_k
    grouped = spec.method != "greedy" and spec.n_group > 1
    use_bias = bias is not None and spec.method == "noaux_tc"
    groups = spec.n_group if grouped else 1
    group = E // groups
    norm = spec.norm_topk_prob and K > 1
    scale = spec.scaling != 1.0 and not (norm and not spec.scale_after_norm)
    ids = torch.empty(N, K, dtype=torch.long, device=device)
    weights = torch.empty(N, K, dtype=torch.float32, device=device)
    if N:
        route_kernel[(N,)](
            logits.float().contiguous(), bias.float().contiguous() if use_bias else logits, ids, weights, E,
            float(spec.scaling), K=K, KB=triton.next_power_of_2(K), G=groups, GP=triton.next_power_of_2(groups),
            GROUP=group, GRP=triton.next_power_of_2(group), TOPK_GROUP=spec.topk_group if grouped else 1,
            SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=use_bias, GROUPED=grouped,
            TOP2=spec.method == "noaux_tc", FILL_ZERO=spec.method != "noaux_tc", NORM=norm, SCALE=scale,
            num_warps=4)
    return ids, weights


@triton.jit
def router_kernel(x, w, out, E, D, sxn, BE: tl.constexpr, BD: tl.constexpr):
    """Program (experts block b, token n): out[n, b * BE : (b + 1) * BE] = w[those experts] @ x[n] in float32."""
    b = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    e = b * BE + tl.arange(0, BE)[:, None]
    d = tl.arange(0, BD)[None, :]
    acc = tl.zeros([BE, BD], dtype=tl.float32)
    for k in range(0, D, BD):
        xk = tl.load(x + n * sxn + k + d, mask=k + d < D, other=0.0).to(tl.float32)
        wk = tl.load(w + e.to(tl.int64) * D + k + d, mask=(e < E) & (k + d < D), other=0.0).to(tl.float32)
        acc += wk * xk
    rows = b * BE + tl.arange(0, BE)
    tl.store(out + n * E + rows, tl.sum(acc, axis=1), mask=rows < E)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, D] (any float dtype), weight [E, D] -> float32 [N, E], as x.float() @ weight.float().t()."""
    device = checks.device_of("x", x)
    checks.device_of("weight", weight, device)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x must be [tokens, D] and weight [experts, D], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype not in checks.FLOAT_DTYPES or weight.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x and weight must be float32, bfloat16 or float16, got {x.dtype} and {weight.dtype}")
    N, D = x.shape
    E = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    out = torch.empty(N, E, dtype=torch.float32, device=device)
    if N and E:
        BE = 4  # small blocks of experts: the grid must spread the router's MBs over many SMs
        router_kernel[(triton.cdiv(E, BE), N)](x, weight, out, E, D, x.stride(0), BE=BE,
                                               BD=min(1024, triton.next_power_of_2(D)), num_warps=4)
    return out
