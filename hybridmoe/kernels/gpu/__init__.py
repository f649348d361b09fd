"""GPU kernels (Triton) over raw GGUF blocks: Q4_0, Q8_0, Q4_K, Q5_K, Q6_K. Needs `triton`.

Weights stay as stored in the file: uint8 [N, row_bytes] on the GPU, one row of blocks per output row.
Activations are float32 / bfloat16 / float16; sums are float32. Tensors are CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1 (the tests' mode on machines without a GPU).

Decode (1 to 8 tokens; each token re-reads the weights, from L2), fused dequant-GEMV:
    gemv(x [n, K], w [N, rb], ggml_type, out_dtype=None) -> [n, N]
    gemv(x [n, K] or [G, n, K], w [E, N, rb], ggml_type, ids=[G]) -> [G, n, N]   G matrices, one launch

Prefill: dequantize, then a torch matmul.
    dequantize(raw, ggml_type, shape, dtype=torch.bfloat16) -> tensor of `shape`   (float32: bit-exact)
    matmul(x [T, K], w [N, rb], ggml_type) -> [T, N]

Routed experts in GPU slots (one contiguous uint8 row per expert; layout in `ffn`):
    SlotLayout(hidden, inter, gate_type, up_type, down_type)  .nbytes .views(slot) .pack(gate, up, down)
    expert_ffn(x [n, D], slot [nbytes] or (gate, up, down), layout) -> [n, D]
    experts_ffn(x [n, D] or [G, n, D], slots [S, nbytes], ids [G], layout) -> [G, n, D]
    dequantize_slots(slots, ids [G], layout, "gate" | "up" | "down") -> [G, rows, K]   one launch (prefill)

Prefill straight from the blocks (tokens sorted by expert, counts[g] rows for slots[ids[g]]; QUANT_GEMM_TYPES):
    grouped_gemm(x [n, K], slots, ids [G], counts, layout, part) -> [n, N]
    grouped_gate_up(x [n, D], slots, ids [G], counts, layout) -> silu(gate) * up [n, I]   one launch

Every wrapper checks its inputs and raises ValueError naming the problem; GPU_TYPES lists the kernel types.
"""
from .api import dequantize, gemv, matmul
from .checks import GPU_TYPES, MAX_TOKENS
from .ffn import ALIGN, SlotLayout, dequantize_slots, expert_ffn, experts_ffn
from .moe_gemm import QUANT_GEMM_TYPES, grouped_gate_up, grouped_gemm

__all__ = ["ALIGN", "GPU_TYPES", "MAX_TOKENS", "QUANT_GEMM_TYPES", "SlotLayout", "dequantize", "dequantize_slots",
           "expert_ffn", "experts_ffn", "gemv", "grouped_gate_up", "grouped_gemm", "matmul"]
