"""How large a prefill chunk and the streamed prefill's staging buffers are on a GPU, and the prefill rate that
predicts for a long prompt. Pure arithmetic, shared by the runtime (from the free VRAM it finds) and `plan` (from a
profile), so that both say the same.

A chunk's experts cross PCIe once (offload.stream), so the larger the chunk, the fewer times a long prompt pays for
them: the chunk is the largest power of two up to MAX_CHUNK (and the context) whose activations fit in
ACTIVATION_SHARE of the VRAM left after weights, KV cache and the fixed reserve (which holds a MIN_CHUNK chunk's);
the staging buffers take up to STAGING_SHARE (two buffers of a layer's experts where that fits, at most
STAGING_BUFFER bytes each: the copies are PCIe-bound, and a few dozen experts already make each copy large); the
expert cache gets the rest. Where the cache holds every expert of its GPU nothing streams, and no staging is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

PREFILL_CHUNK = 512  # where no GPU budget sizes it (the CPU engine, the CPU standing in for GPUs)
MIN_CHUNK = 512
MAX_CHUNK = 8192
ACTIVATION_SHARE = 0.25
STAGING_SHARE = 0.25
STAGING_BUFFER = 2 << 30


def activation_bytes_per_token(dim: int, inter: int, top_k: int, dtype_bytes: int = 2) -> int:
    """Peak bytes one prefill token holds on its GPU inside a MoE layer: the hidden state, its norm and attention's
    q, k, v and output (taken as 8 x D); [K, D] four times (the experts' parts, the tokens sorted by expert, the
    outputs and their concatenation); [K, I] four times (gate, up, silu's temporary, the product)."""
    return dtype_bytes * (8 * dim + 4 * top_k * dim + 4 * top_k * inter)


@dataclass(frozen=True, slots=True)
class PrefillSizes:
    chunk: int  # prefill tokens per forward pass
    staging_rows: int  # expert rows per staging buffer (0: nothing streams on this GPU)
    staging_bytes: int  # both buffers
    activation_bytes: int  # a chunk's activations beyond those the fixed reserve holds
    slots: int  # expert cache slots that fit beside them


def chunk_tokens(budget: int, per_token: int, context: int) -> int:
    """The largest power of two from MIN_CHUNK to min(MAX_CHUNK, context) whose activations beyond a MIN_CHUNK
    chunk's fit `budget` (the fixed reserve covers those of MIN_CHUNK tokens, the size chunks had before they were
    sized, and the grouped prefill's scratch)."""
    top = max(MIN_CHUNK, min(MAX_CHUNK, context))
    chunk = MIN_CHUNK
    while chunk * 2 <= top and (chunk * 2 - MIN_CHUNK) * per_token <= budget:
        chunk *= 2
    return chunk


def size_prefill(room: int, *, stage_experts: int, layer_experts: int, slot_bytes: int, per_token: int,
                 context: int, max_slots: int | None = None, stream: bool = False) -> PrefillSizes:
    """Sizes for one GPU. room: bytes free after its weights, KV cache and fixed reserve; stage_experts: experts of
    its layers; layer_experts: the most experts a layer of the model has; slot_bytes: one expert's slot row;
    max_slots: the user's cap on cache slots; stream: keep staging even if this GPU caches all of its experts
    (another GPU streams, and this one takes a share of its copies)."""
    room = max(0, room)
    chunk = chunk_tokens(int(ACTIVATION_SHARE * room), per_token, context)
    act = (chunk - MIN_CHUNK) * per_token
    want = stage_experts if max_slots is None else min(max_slots, stage_experts)
    left = max(0, room - act)
    if not stream and want == stage_experts and want * slot_bytes <= left:  # every expert resident: no streaming
        return PrefillSizes(chunk, 0, 0, act, want)
    rows = min(layer_experts, min(int(STAGING_SHARE * room), 2 * STAGING_BUFFER) // (2 * max(1, slot_bytes)))
    staging = 2 * rows * slot_bytes
    slots = max(0, min(want, (left - staging) // max(1, slot_bytes)))
    return PrefillSizes(chunk, rows, staging, act, slots)


@dataclass(frozen=True, slots=True)
class ExpertLayer:
    """What prefill moves and computes for one MoE layer: its experts, their bytes, the share of them cached."""
    experts: int
    nbytes: int  # all experts of the layer
    cached: float  # share of the layer's experts in the GPU's cache


def predicted_prefill_tok_s(n_tokens: int, chunk: int, layers: list[ExpertLayer], top_k: int,
                            flops_per_token: float, h2d_bytes_per_s: float, gpu_flops: float,
                            disk_share: float = 0.0, disk_bytes_per_s: float = float("inf"),
                            dense_flops_per_token: float = 0.0) -> float:
    """Tokens/s of a prompt of n_tokens read in chunks: per chunk and MoE layer, the uncached experts the chunk uses
    (uniform routing: a share 1 - (1 - K/E)^T) cross PCIe while the previous layer computes, so a layer costs the
    longest of its copy, its compute (its experts' and its share of the dense work: attention, shared experts, the
    head) and, for the share of the experts' bytes that the page cache cannot hold (disk_share), their reads from
    disk. Matrix products at gpu_flops and attention's cost in the context left out: an upper bound."""
    total = 0.0
    dense = dense_flops_per_token / max(1, len(layers))
    for start in range(0, n_tokens, chunk):
        t = min(chunk, n_tokens - start)
        for lay in layers:
            moved = (1.0 - lay.cached) * (1.0 - (1.0 - top_k / lay.experts) ** t) * lay.nbytes
            compute = t * (top_k * flops_per_token + dense) / gpu_flops
            total += max(moved / h2d_bytes_per_s, disk_share * moved / disk_bytes_per_s, compute)
    return n_tokens / total if total > 0 else float("inf")
