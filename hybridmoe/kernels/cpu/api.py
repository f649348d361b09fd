"""Typed wrappers around the numba kernels: they check dtypes, contiguity and shapes, then launch."""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import as_qtype, get_format
from hybridmoe.quant import dequantize as reference_dequantize

from . import attention as attention_kernels
from . import combine as combine_kernels
from . import int8 as int8_kernels
from . import mla as mla_kernels
from . import norm as norm_kernels
from . import packed as packed_kernels
from . import raw_gemm as raw_gemm_kernels
from . import raw_int8 as raw_int8_kernels
from . import router as router_kernels
from .checks import Array, activations, kernel_type, weights
from .raw import KIND, W32, dequantize_rows, gemv_raw
from .repack import (ACTIVATIONS, DEFAULT_LANES, PACKED_TYPES, PackedExperts, PackedWeight, repack_experts_raw,
                     repack_raw)

# (kernel, group size of the activation sums it takes; None: it takes none)
_PACKED = {
    T.Q4_0: (packed_kernels.gemv_q4_0, 32),
    T.Q8_0: (packed_kernels.gemv_q8_0, None),
    T.Q4_K: (packed_kernels.gemv_q4_k, 32),
    T.Q5_K: (packed_kernels.gemv_q5_k, 32),
    T.Q6_K: (packed_kernels.gemv_q6_k, 16),
}
GEMV_TYPES = tuple(KIND)
RAW_INT8_TYPES = tuple(raw_int8_kernels.KIND)
_PREFILL_TILE_ROWS = 512
_NO_ROWS = np.empty((0, 0), dtype=np.float32)  # an absent optional [n, ...] input


def set_threads(n: int) -> None:
    """Threads used by every CPU kernel (default: all cores)."""
    numba.set_num_threads(n)


def get_threads() -> int:
    """Threads the CPU kernels use when called from this thread."""
    return numba.get_num_threads()


def _like_input(y: np.ndarray, x: Array) -> Array:
    return torch.from_numpy(y) if isinstance(x, torch.Tensor) else y


def gemv(x: Array, w_raw: np.ndarray, ggml_type: T | int) -> Array:
    """Decode: y[n, N] = x[n, K] @ W.T with W as raw GGUF rows (uint8 [N, row_bytes]); f32 in, f32 out.

    Activations stay float32 (no 8-bit rounding): the result matches dequantize-then-matmul to float32 rounding."""
    xa = activations(x)
    qtype = kernel_type(ggml_type, GEMV_TYPES)
    weights(w_raw, qtype, xa.shape[1])
    y = np.empty((xa.shape[0], w_raw.shape[0]), dtype=np.float32)
    gemv_raw(KIND[qtype], xa, w_raw, y, W32)
    return _like_input(y, x)


def gemv_int8(x: Array, w_raw: np.ndarray, ggml_type: T | int) -> Array:
    """Decode with 8-bit activations, W as raw GGUF rows (the mmap tier: nothing is copied): y[n, N] = rounded(x)
    @ W.T, x rounded per group of 32 as `gemv_packed` of an int8 repack rounds it (the two agree to float32
    rounding). Q8_0, Q2_K to Q6_K, IQ4_XS (`raw_int8.py`)."""
    xa = activations(x)
    qtype = kernel_type(ggml_type, RAW_INT8_TYPES)
    weights(w_raw, qtype, xa.shape[1])
    y = np.empty((1, xa.shape[0], w_raw.shape[0]), dtype=np.float32)
    raw_int8_kernels.gemv(raw_int8_kernels.KIND[qtype], xa, w_raw[None], np.zeros(1, dtype=np.int64), y)
    return _like_input(y[0], x)


def _raw_experts(x: Array, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple,
                 experts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked inputs of the raw 8-bit expert kernels -> (x as float32 numpy, expert ids, kinds)."""
    xa = activations(x)
    qtypes = [kernel_type(t, RAW_INT8_TYPES) for t in types]
    if len(qtypes) != 3:
        raise ValueError(f"types must name gate, up and down, got {len(qtypes)}")
    for name, raw in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(raw, np.ndarray) or raw.ndim != 3 or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous uint8 [E, rows, row_bytes] array")
    n_inter = gate.shape[1]
    for name, raw, qtype, k_dim in (("gate", gate, qtypes[0], xa.shape[1]), ("up", up, qtypes[1], xa.shape[1]),
                                    ("down", down, qtypes[2], n_inter)):
        fmt = get_format(qtype)
        if k_dim % fmt.block_size or raw.shape[2] != fmt.row_bytes(k_dim):
            raise ValueError(f"{name}: rows of {raw.shape[2]} bytes do not hold K = {k_dim} of {qtype.name}")
    if up.shape[:2] != gate.shape[:2] or down.shape[0] != gate.shape[0]:
        raise ValueError(f"expert shapes do not fit: gate {gate.shape}, up {up.shape}, down {down.shape}")
    if len(experts) == 0 or min(experts) < 0 or max(experts) >= gate.shape[0]:
        raise ValueError(f"experts must be a non-empty list of ids below {gate.shape[0]}, got {experts}")
    kinds = np.array([raw_int8_kernels.KIND[q] for q in qtypes], dtype=np.int64)
    return xa, np.asarray(experts, dtype=np.int64), kinds


def ffn_raw_int8(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple, experts: list[int],
                 routing_weights: np.ndarray | None = None) -> np.ndarray:
    """Several experts of one layer on the same tokens, from the raw GGUF bytes, with 8-bit activations, in one
    call: gate, up uint8 [E, I, row_bytes], down uint8 [E, D, row_bytes] (stacked expert tensors, e.g. mmap'd),
    types their GGML types (RAW_INT8_TYPES) -> f32 [G, n, D], expert experts[g] in row g; with routing_weights
    f32 [n, G], their weighted sum f32 [n, D] instead (the bits `layers.moe.combine` gives of the former). Each expert
    agrees with `ffn_experts` of an int8 repack to float32 rounding."""
    xa, ids, kinds = _raw_experts(x, gate, up, down, types, experts)
    y = np.empty((ids.size, xa.shape[0], down.shape[1]), dtype=np.float32)
    if routing_weights is None:
        raw_int8_kernels.ffn(kinds, xa, gate, up, down, ids, y, _NO_ROWS, _NO_ROWS)
        return y
    w = activations(routing_weights)
    if w.shape != (xa.shape[0], ids.size):
        raise ValueError(f"weights must be [{xa.shape[0]}, {ids.size}], got {list(w.shape)}")
    out = np.empty((xa.shape[0], down.shape[1]), dtype=np.float32)
    raw_int8_kernels.ffn(kinds, xa, gate, up, down, ids, y, w, out)
    return out


def ffn_raw_int8_grouped(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple,
                         experts: list[int], counts: list[int]) -> np.ndarray:
    """Prefill: each expert on its own tokens, all of a layer's in one call, from the raw GGUF bytes with 8-bit
    activations: x f32 [sum(counts), D] holds counts[g] rows for expert experts[g], in that order -> f32 [sum(counts),
    D], each row through its expert, x rounded as `ffn_raw_int8` rounds it (the sums in another order; an expert's
    rows do not depend on the other experts of the call). Every weight row is read once for all of its expert's
    tokens (`raw_gemm.py`)."""
    xa, ids, kinds = _raw_experts(x, gate, up, down, types, experts)
    if len(counts) != ids.size or min(counts) < 0 or sum(counts) != xa.shape[0]:
        raise ValueError(f"{len(counts)} token counts summing to {sum(counts)} for {ids.size} experts and "
                         f"{xa.shape[0]} rows of x")
    starts = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    y = np.empty((xa.shape[0], down.shape[1]), dtype=np.float32)
    raw_gemm_kernels.ffn_grouped(kinds, xa, gate, up, down, ids, starts, y, numba.get_num_threads())
    return y


def decode_route(ggml_type: T | int) -> str:
    """How the CPU decodes experts of this type, in words (for `hybridmoe inspect`)."""
    qtype = as_qtype(ggml_type)
    if qtype in RAW_INT8_TYPES:
        return "exact row kernel; in place with --cpu-activations int8"
    if qtype in PACKED_TYPES:
        return "exact row kernel; repacked copy with --cpu-activations int8"
    if qtype in KIND:
        return "exact row kernel only (no 8-bit kernel: slower)"
    return "no CPU kernel: dequantized for a matmul (much slower)"


def _activation_mode(mode: str) -> str:
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations {mode!r}: use one of {', '.join(ACTIVATIONS)}")
    return mode


def _columns(w_raw: np.ndarray, qtype: T) -> int:
    if not isinstance(w_raw, np.ndarray) or w_raw.ndim != 2:
        raise ValueError("w_raw must be a [N, row_bytes] numpy array")
    fmt = get_format(qtype)
    k_dim = w_raw.shape[1] // fmt.type_size * fmt.block_size
    weights(w_raw, qtype, k_dim)
    return k_dim


def repack(w_raw: np.ndarray, ggml_type: T | int, lanes: int = DEFAULT_LANES, activations: str = "f32") -> PackedWeight:
    """Copy raw GGUF rows into the lane-interleaved layout that `gemv_packed` reads at memory speed.
    activations="int8": the layout of the kernels that round x to 8 bits per group of 32 (16 lanes, `lanes` unused)."""
    qtype = kernel_type(ggml_type, PACKED_TYPES)
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    return repack_raw(w_raw, qtype, _columns(w_raw, qtype), lanes, _activation_mode(activations))


def repack_experts(raw: np.ndarray, ggml_type: T | int, activations: str = "f32") -> PackedExperts:
    """Every expert of a stacked GGUF tensor (uint8 [E, N, row_bytes]) repacked into one stacked copy."""
    qtype = kernel_type(ggml_type, PACKED_TYPES)
    if not isinstance(raw, np.ndarray) or raw.ndim != 3 or raw.shape[0] == 0:
        raise ValueError("raw must be a [E >= 1, N, row_bytes] numpy array")
    k_dim = _columns(np.ascontiguousarray(raw[0]), qtype)
    return repack_experts_raw(raw, qtype, k_dim, _activation_mode(activations))


def _int8_gemv(xa: np.ndarray, w: PackedWeight) -> np.ndarray:
    y = np.empty((1, xa.shape[0], w.arrays[0].shape[0] * w.lanes), dtype=np.float32)
    int8_kernels.gemv(KIND[w.qtype], xa, *(a[None] for a in w.arrays), np.zeros(1, dtype=np.int64), y)
    return y[0, :, :w.n_rows]


def gemv_packed(x: Array, w: PackedWeight) -> Array:
    """Decode over a repacked weight: y[n, N] = x[n, K] @ W.T (x rounded to 8 bits first if w was repacked for
    activations="int8")."""
    xa = activations(x)
    if xa.shape[1] != w.n_cols:
        raise ValueError(f"x has K = {xa.shape[1]}, the weight has {w.n_cols} columns")
    if w.activations == "int8":
        return _like_input(np.ascontiguousarray(_int8_gemv(xa, w)), x)
    return _like_input(_packed(xa, w), x)


def _packed(xa: np.ndarray, w: PackedWeight) -> np.ndarray:
    kernel, group = _PACKED[w.qtype]
    y = np.empty((xa.shape[0], w.n_rows), dtype=np.float32)
    kernel(xa, _NO_ROWS if group is None else xa.reshape(xa.shape[0], -1, group).sum(axis=-1), *w.arrays, y)
    return y


def _expert_shapes(xa: np.ndarray, gate, up, down) -> None:
    if (xa.shape[1] != gate.n_cols or up.n_cols != gate.n_cols or down.n_cols != gate.n_rows
            or up.n_rows != gate.n_rows):
        raise ValueError(f"expert shapes do not fit: x K={xa.shape[1]}, gate {gate.n_rows}x{gate.n_cols}, "
                         f"up {up.n_rows}x{up.n_cols}, down {down.n_rows}x{down.n_cols}")
    if len({gate.activations, up.activations, down.activations}) != 1:
        raise ValueError("gate, up and down were repacked for different activations")


def _int8_ffn(xa: np.ndarray, gate, up, down, experts: np.ndarray, w: np.ndarray = _NO_ROWS,
              out: np.ndarray = _NO_ROWS) -> np.ndarray:
    """[G, n, D] from stacked int8-layout arrays ([E, tiles, ...]), one kernel call; with weights w [n, G] also
    their weighted sum into out [n, D]."""
    y = np.empty((experts.size, xa.shape[0], down.arrays[0].shape[-2] * down.lanes), dtype=np.float32)
    kinds = np.array([KIND[gate.qtype], KIND[up.qtype], KIND[down.qtype]], dtype=np.int64)
    int8_kernels.ffn(kinds, xa, gate.n_rows, *gate.arrays, *up.arrays, *down.arrays, experts, y, w, out)
    return y[:, :, :down.n_rows]


def ffn_packed(x: np.ndarray, gate: PackedWeight, up: PackedWeight, down: PackedWeight) -> np.ndarray:
    """One expert at decode, down(silu(gate(x)) * up(x)), from repacked weights: f32 [n, D] -> f32 [n, D].
    Checks once and calls the kernels directly, for the dozens of experts a decode step runs."""
    xa = activations(x)
    _expert_shapes(xa, gate, up, down)
    if gate.activations == "int8":
        stacked = [PackedExperts(w.qtype, w.n_rows, w.n_cols, w.lanes, tuple(a[None] for a in w.arrays), "int8")
                   for w in (gate, up, down)]
        return np.ascontiguousarray(_int8_ffn(xa, *stacked, np.zeros(1, dtype=np.int64))[0])
    g = _packed(xa, gate)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu's limit, -0
        h = g / (np.float32(1) + np.exp(-g)) * _packed(xa, up)  # silu(gate) * up
    return _packed(np.ascontiguousarray(h, dtype=np.float32), down)


def _expert_ids(xa: np.ndarray, gate: PackedExperts, up: PackedExperts, down: PackedExperts,
                experts: list[int]) -> np.ndarray:
    _expert_shapes(xa, gate, up, down)
    if len(experts) == 0 or min(experts) < 0 or max(experts) >= gate.n_experts:
        raise ValueError(f"experts must be a non-empty list of ids below {gate.n_experts}, got {experts}")
    if any(w.n_experts != gate.n_experts for w in (up, down)):
        raise ValueError("gate, up and down hold different numbers of experts")
    return np.asarray(experts, dtype=np.int64)


def ffn_experts(x: np.ndarray, gate: PackedExperts, up: PackedExperts, down: PackedExperts,
                experts: list[int]) -> np.ndarray:
    """Several experts of one layer on the same tokens: f32 [n, D] -> f32 [G, n, D], expert experts[g] in row g.
    With 8-bit activations one kernel call runs them all (x quantized once); with float32 activations each expert
    runs as `ffn_packed`. Either way each expert's result is the one `ffn_packed` gives for it alone."""
    xa = activations(x)
    ids = _expert_ids(xa, gate, up, down, experts)
    if gate.activations == "int8":
        return np.ascontiguousarray(_int8_ffn(xa, gate, up, down, ids))
    return np.stack([ffn_packed(xa, gate.expert(e), up.expert(e), down.expert(e)) for e in experts])


def ffn_experts_sum(x: np.ndarray, gate: PackedExperts, up: PackedExperts, down: PackedExperts, experts: list[int],
                    weights: np.ndarray) -> np.ndarray:
    """sum_g weights[:, g] * ffn_experts(x, ...)[g]: f32 [n, D], weights f32 [n, G]; the same bits as
    `layers.moe.combine` of ffn_experts' result (`combine.py`), without the stacked copy (with 8-bit activations,
    in the same kernel call)."""
    xa, w = activations(x), activations(weights)
    ids = _expert_ids(xa, gate, up, down, experts)
    if w.shape != (xa.shape[0], len(experts)):
        raise ValueError(f"weights must be [{xa.shape[0]}, {len(experts)}], got {list(w.shape)}")
    out = np.empty((xa.shape[0], down.n_rows), dtype=np.float32)
    if gate.activations == "int8":
        _int8_ffn(xa, gate, up, down, ids, w, out)
    else:
        combine_kernels.weighted_sum(ffn_experts(xa, gate, up, down, experts), w, out)
    return out


def dequantize(w_raw: np.ndarray, ggml_type: T | int, n_cols: int) -> np.ndarray:
    """Raw rows -> float32 [N, n_cols], multithreaded for kernel types, the numpy reference for the others."""
    qtype = as_qtype(ggml_type)
    weights(w_raw, qtype, n_cols)
    if qtype not in KIND:
        return reference_dequantize(w_raw, qtype, (w_raw.shape[0], n_cols))
    out = np.empty((w_raw.shape[0], n_cols), dtype=np.float32)
    dequantize_rows(KIND[qtype], w_raw, out, W32)
    return out


def matmul(x: Array, w_raw: np.ndarray, ggml_type: T | int) -> torch.Tensor:
    """Prefill: y[T, N] = x[T, K] @ W.T, dequantizing W in row tiles to float32 for torch.matmul."""
    xt = torch.from_numpy(activations(x))
    qtype = as_qtype(ggml_type)
    k_dim = xt.shape[1]
    weights(w_raw, qtype, k_dim)
    n_rows = w_raw.shape[0]
    y = torch.empty((xt.shape[0], n_rows), dtype=torch.float32)
    for r0 in range(0, n_rows, _PREFILL_TILE_ROWS):
        r1 = min(n_rows, r0 + _PREFILL_TILE_ROWS)
        tile = torch.from_numpy(dequantize(w_raw[r0:r1], qtype, k_dim))
        y[:, r0:r1] = xt @ tile.T
    return y


_NO_WEIGHT = np.empty(0, dtype=np.float32)


def _f32_contiguous(name: str, t: torch.Tensor | None, shape: tuple[int, ...], reshape: bool = False) -> np.ndarray:
    """A float32 CPU tensor (or numpy array) of `shape` (reshape: of as many elements, reshaped here, where numpy's
    reshape costs less than torch's), C-contiguous, as its numpy view (None: an empty array)."""
    if t is None:
        return _NO_WEIGHT
    a = t if isinstance(t, np.ndarray) else None
    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
        a = t.detach().numpy() if t.requires_grad else t.numpy()
    if a is None or a.dtype != np.float32:
        raise ValueError(f"{name} must be a float32 tensor on the CPU")
    if (a.size != math.prod(shape) if reshape else a.shape != shape) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous of shape {list(shape)}, got {list(a.shape)}")
    return a.reshape(shape)


def gqa_decode(qkv: torch.Tensor, n_heads: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
               eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: int, scale: float) -> torch.Tensor:
    """One decode step of grouped-query attention (`attention.py`): qkv [(H + 2 Hk) * D] (q, k, v heads, as the
    projections give them; any shape of that size, as are cos and sin); q_norm, k_norm: RMSNorm weights [D] or
    None; cos, sin [D/2] at the token's position
    (half-split rope); k_cache, v_cache [max_len, Hk, D] of the token's slot, written at `pos`, whose keys
    0..pos are attended to. All float32 on the CPU. -> [H * D]."""
    if k_cache.dim() != 3:
        raise ValueError(f"k_cache must be [max_len, Hk, D], got shape {list(k_cache.shape)}")
    max_len, n_kv, dim = k_cache.shape
    if n_kv < 1 or n_heads % n_kv or dim % 2:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} kv heads of dim {dim}")
    if not 0 <= pos < max_len:
        raise ValueError(f"position {pos} is outside a cache of {max_len}")
    cache_shape = (max_len, n_kv, dim)
    out = np.empty(n_heads * dim, dtype=np.float32)
    attention_kernels.gqa_decode(
        _f32_contiguous("qkv", qkv, ((n_heads + 2 * n_kv) * dim,), reshape=True), n_heads,
        _f32_contiguous("q_norm", q_norm, (dim,)), _f32_contiguous("k_norm", k_norm, (dim,)), np.float32(eps),
        _f32_contiguous("cos", cos, (dim // 2,), reshape=True), _f32_contiguous("sin", sin, (dim // 2,), reshape=True),
        _f32_contiguous("k_cache", k_cache, cache_shape), _f32_contiguous("v_cache", v_cache, cache_shape), pos,
        np.float32(scale), out)
    return torch.from_numpy(out)


def _mla_dims(q: torch.Tensor, n_heads: int, latent_cache: torch.Tensor, pe_cache: torch.Tensor,
              pos: int) -> tuple[int, int, int, int]:
    """Checked (max_len, R, P, N) of an MLA decode step's inputs."""
    if latent_cache.dim() != 2 or pe_cache.dim() != 2 or pe_cache.shape[0] != latent_cache.shape[0]:
        raise ValueError(f"caches must be [max_len, R] and [max_len, P], got {list(latent_cache.shape)} and "
                         f"{list(pe_cache.shape)}")
    max_len, rank = latent_cache.shape
    rope = pe_cache.shape[1]
    if not 0 <= pos < max_len:
        raise ValueError(f"position {pos} is outside a cache of {max_len}")
    qk = q.numel() // max(1, n_heads)
    if n_heads < 1 or qk * n_heads != q.numel() or qk <= rope or rope % 2:
        raise ValueError(f"q of {q.numel()} values is not {n_heads} heads of a rope part of {rope} (even) and more")
    return max_len, rank, rope, qk - rope


def _mla_common(q, kv, n_heads, kv_norm, eps, cos, sin, latent_cache, pe_cache, dims) -> tuple:
    """The float32 numpy views both MLA kernels take before their weights: q, kv, kv_norm, eps, cos, sin."""
    max_len, rank, rope, nope = dims
    return (_f32_contiguous("q", q, (n_heads, nope + rope), reshape=True),
            _f32_contiguous("kv", kv, (rank + rope,), reshape=True), _f32_contiguous("kv_norm", kv_norm, (rank,)),
            np.float32(eps), _f32_contiguous("cos", cos, (rope // 2,), reshape=True),
            _f32_contiguous("sin", sin, (rope // 2,), reshape=True))


def _mla_caches(latent_cache, pe_cache, dims) -> tuple:
    max_len, rank, rope, _ = dims
    return (_f32_contiguous("latent_cache", latent_cache, (max_len, rank)),
            _f32_contiguous("pe_cache", pe_cache, (max_len, rope)))


def mla_decode(q: torch.Tensor, kv: torch.Tensor, n_heads: int, kv_norm: torch.Tensor, eps: float,
               cos: torch.Tensor, sin: torch.Tensor, w_kv_b: torch.Tensor, latent_cache: torch.Tensor,
               pe_cache: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """One decode step of multi-head latent attention, absorbed form (`mla.py`): q [H * (N + P)] (wq_b's output),
    kv [R + P] (wkv_a's: latent, then rope key; rope pairs interleaved), any shapes of those sizes, as cos and sin
    [P/2]; kv_norm [R] (the latent's RMSNorm weight), w_kv_b [H * (N + V), R]; latent_cache [max_len, R] and
    pe_cache [max_len, P] of the token's slot, written at `pos`, whose keys 0..pos are attended to. All float32 on
    the CPU. -> [H * V]."""
    dims = _mla_dims(q, n_heads, latent_cache, pe_cache, pos)
    rank, nope = dims[1], dims[3]
    if w_kv_b.dim() != 2 or w_kv_b.shape[1] != rank or w_kv_b.shape[0] % n_heads:
        raise ValueError(f"w_kv_b must be [{n_heads} * (N + V), {rank}], got {list(w_kv_b.shape)}")
    v_dim = w_kv_b.shape[0] // n_heads - nope
    if v_dim < 1:
        raise ValueError(f"w_kv_b's {w_kv_b.shape[0]} rows leave no values after {n_heads} x {nope} key rows")
    out = np.empty((n_heads, v_dim), dtype=np.float32)
    mla_kernels.mla_decode(*_mla_common(q, kv, n_heads, kv_norm, eps, cos, sin, latent_cache, pe_cache, dims),
                           _f32_contiguous("w_kv_b", w_kv_b, (n_heads, nope + v_dim, rank), reshape=True),
                           *_mla_caches(latent_cache, pe_cache, dims), pos, np.float32(scale), out)
    return torch.from_numpy(out).view(-1)


def _absorbed_raw(k_b: np.ndarray, v_b: np.ndarray, ggml_type: T | int, n_heads: int, rank: int, nope: int) -> T:
    """Checks attn_k_b (uint8 [H, R, row bytes of N]) and attn_v_b ([H, V, row bytes of R]) -> their type."""
    qtype = kernel_type(ggml_type, GEMV_TYPES)
    fmt = get_format(qtype)
    for name, raw, rows, k_dim in (("k_b", k_b, rank, nope), ("v_b", v_b, None, rank)):
        if (not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 3 or not raw.flags.c_contiguous
                or raw.shape[0] != n_heads or (rows is not None and raw.shape[1] != rows)
                or k_dim % fmt.block_size or raw.shape[2] != fmt.row_bytes(k_dim)):
            raise ValueError(f"{name} must be C-contiguous uint8 [{n_heads}, {rows or 'V'}, rows of K = {k_dim} in "
                             f"{qtype.name}], got {getattr(raw, 'shape', None)}")
    return qtype


def mla_decode_raw(q: torch.Tensor, kv: torch.Tensor, n_heads: int, kv_norm: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, k_b: np.ndarray, v_b: np.ndarray, ggml_type: T | int,
                   latent_cache: torch.Tensor, pe_cache: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """mla_decode with wkv_b as GGUF's attn_k_b (uint8 [H, R, row bytes of N]) and attn_v_b (uint8 [H, V, row bytes
    of R]) of one GEMV_TYPES type, dequantized row by row inside the kernel: mla_decode's result on the dequantized
    weights (float32 activations), reading the file's bytes."""
    dims = _mla_dims(q, n_heads, latent_cache, pe_cache, pos)
    qtype = _absorbed_raw(k_b, v_b, ggml_type, n_heads, dims[1], dims[3])
    out = np.empty((n_heads, v_b.shape[1]), dtype=np.float32)
    mla_kernels.mla_decode_raw(*_mla_common(q, kv, n_heads, kv_norm, eps, cos, sin, latent_cache, pe_cache, dims),
                               KIND[qtype], k_b, v_b, *_mla_caches(latent_cache, pe_cache, dims), pos,
                               np.float32(scale), W32, out)
    return torch.from_numpy(out).view(-1)


def route_softmax(x: torch.Tensor, router: torch.Tensor, top_k: int, renorm: bool,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (`router.py`): x f32 [n, D], router f32 [E, D] on the CPU -> (ids [n, K] long, best
    first; weights [n, K] f32: the chosen scores, divided by their sum if renorm, times scaling)."""
    return route_topk(x, router, top_k, renorm, scaling)


def route_topk(x: torch.Tensor, router: torch.Tensor, top_k: int, renorm: bool, scaling: float, *,
               sigmoid: bool = False, bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
               top2_groups: bool = False, masked: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing in one call (`router.py`): x f32 [n, D], router f32 [E, D] on the CPU -> (ids [n, K] long, best
    first; weights [n, K] f32). Scores are softmax or sigmoid of the logits; experts are chosen by score + bias
    (f32 [E], optional), among the topk_group best of n_group groups (scored by their best, or with top2_groups
    their two best, choice values; the other groups' values become `masked`); weights are the chosen scores,
    divided by their sum if renorm, times scaling."""
    xa = activations(x)
    ids = np.empty((xa.shape[0], top_k), dtype=np.int64)
    weights = np.empty((xa.shape[0], top_k), dtype=np.float32)
    router_kernels.route(xa, *routing_args(router, xa.shape[1], top_k, renorm, scaling, sigmoid, bias, n_group,
                                           topk_group, top2_groups, masked), ids, weights)
    return torch.from_numpy(ids), torch.from_numpy(weights)


def routing_args(router: torch.Tensor, dim: int, top_k: int, renorm: bool, scaling: float, sigmoid: bool,
                 bias: torch.Tensor | None, n_group: int, topk_group: int, top2_groups: bool, masked: float) -> tuple:
    """route_topk's settings, checked, as `router.route` takes them after x."""
    n_experts = router.shape[0] if router.dim() == 2 else 0
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k {top_k} of a router of shape {list(router.shape)}")
    if (n_group < 1 or n_experts % n_group or not 1 <= topk_group <= n_group
            or (top2_groups and n_experts < 2 * n_group)):
        raise ValueError(f"{n_experts} experts cannot form {n_group} groups with {topk_group} kept")
    if top_k > topk_group * (n_experts // n_group) and masked == float("-inf"):
        raise ValueError(f"top_k {top_k} exceeds the experts of {topk_group} groups")
    return (_f32_contiguous("router", router, (n_experts, dim)), _f32_contiguous("bias", bias, (n_experts,)),
            sigmoid, n_group, topk_group, top2_groups, np.float32(masked), renorm, np.float32(scaling))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of a few float32 rows on the CPU (`norm.py`), optionally of x + residual: x [..., D], weight [D] ->
    (x + residual, or x itself without one; the normalised rows times weight), both shaped as x."""
    shape = x.shape
    xa = activations(x.reshape(-1, shape[-1]))
    w = _f32_contiguous("weight", weight, (xa.shape[1],))
    out = np.empty_like(xa)
    if residual is None:
        norm_kernels.add_rms_norm(xa, _NO_ROWS, w, np.float32(eps), _NO_ROWS, out)
        return x, torch.from_numpy(out).view(shape)
    if residual.shape != shape:
        raise ValueError(f"residual has shape {list(residual.shape)}, x {list(shape)}")
    total = np.empty_like(xa)
    norm_kernels.add_rms_norm(xa, activations(residual.reshape(xa.shape)), w, np.float32(eps), total, out)
    return torch.from_numpy(total).view(shape), torch.from_numpy(out).view(shape)
