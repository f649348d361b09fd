"""The grouped quantized GEMM (kernels.gpu.moe_gemm) against dequantize + matmul: each expert's rows of x times its
weights, dequantized by the numpy reference and rounded to bf16 as the kernel's operands are.

On a machine with CUDA it runs on the GPU; elsewhere Triton's interpreter runs it on CPU tensors (small shapes).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels import gpu  # noqa: E402
from hybridmoe.kernels.gpu import moe_gemm  # noqa: E402
from hybridmoe.quant import dequantize, random_blocks  # noqa: E402

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
D, I, E = 256, 512, 4
LAYOUT = gpu.SlotLayout(D, I, T.Q4_K, T.Q4_K, T.Q4_K)
SLOT_IDS = [3, 0, 2]
COUNTS = [3, 70, 5]  # one expert spans two row tiles of 64
# Each output is a float32 sum of bf16 products, rounded to bf16 once (the reference's order of summation differs).
TOL = 2.0**-7


def make_slots() -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    slots = torch.zeros(E, LAYOUT.nbytes + 256, dtype=torch.uint8)  # rows wider than the layout, as staging has
    mats = []
    for s in range(E):
        raws = [random_blocks(T.Q4_K, rows * cols // 256, rng).reshape(rows, -1)
                for rows, cols in ((I, D), (I, D), (D, I))]
        LAYOUT.pack(*raws, out=slots[s, :LAYOUT.nbytes])
        mats.append(tuple(dequantize(r, T.Q4_K, (r.shape[0], r.shape[1] // 144 * 256)) for r in raws))
    return slots.to(DEVICE), mats


SLOTS, MATS = make_slots()


def bf16(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32).to(torch.bfloat16).float()


def reference(x: torch.Tensor, part: int | None) -> torch.Tensor:
    """Each expert's rows through one projection (part) or silu(gate) * up (None), in float32 from bf16 operands."""
    out = []
    for s, xe in zip(SLOT_IDS, bf16(x).split(COUNTS)):
        g, u, d = (bf16(m) for m in MATS[s])
        out.append(F.silu(xe @ g.T) * (xe @ u.T) if part is None else xe @ (g, u, d)[part].T)
    return torch.cat(out)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and torch.isfinite(y).all()
    return float((y.cpu().float() - ref).abs().max() / ref.abs().max())


def ids() -> torch.Tensor:
    return torch.tensor(SLOT_IDS, dtype=torch.int32, device=DEVICE)


def test_fused_gate_up_matches_dequantize_and_matmul():
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(1))
    y = gpu.grouped_gate_up(x.to(DEVICE, torch.bfloat16), SLOTS, ids(), COUNTS, LAYOUT)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, reference(x, None)) < TOL


@pytest.mark.parametrize("part", ["gate", "down"])
def test_one_projection_matches_dequantize_and_matmul(part):
    k = I if part == "down" else D
    x = torch.randn(sum(COUNTS), k, generator=torch.Generator().manual_seed(2))
    y = gpu.grouped_gemm(x.to(DEVICE, torch.bfloat16), SLOTS, ids(), COUNTS, LAYOUT, part, out_dtype=torch.float32)
    assert rel_error(y, reference(x, ("gate", "up", "down").index(part))) < TOL


def test_tiles_stay_within_one_expert():
    assert moe_gemm.tile_table([3, 70, 5], 64).tolist() == [[0, 0, 3], [1, 3, 67], [1, 67, 73], [2, 73, 78]]


def test_inputs_are_checked():
    x = torch.zeros(sum(COUNTS), D, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="3 token counts"):
        gpu.grouped_gate_up(x, SLOTS, ids(), [3, 70, 4], LAYOUT)
    with pytest.raises(ValueError, match="Q8_0"):
        gpu.grouped_gemm(x, SLOTS, ids(), COUNTS, gpu.SlotLayout(D, I, T.Q8_0, T.Q8_0, T.Q8_0), "gate")
    with pytest.raises(ValueError, match="gate .Q4_K. and up .Q6_K. differ"):
        gpu.grouped_gate_up(x, SLOTS, ids(), COUNTS, gpu.SlotLayout(D, I, T.Q4_K, T.Q6_K, T.Q4_K))


def test_a_q4_k_layer_runs_its_prefill_from_the_blocks(monkeypatch):
    """QuantStore.compute_slots_prefill with Q4_K chosen for the quantized GEMM: no dequantization at all (gate and
    up in one launch, down in another), within a bf16 step of the dequantize + grouped matmul path."""
    from hybridmoe.formats.gguf import GGUFTensor
    from hybridmoe.offload.quant_store import QuantStore
    rng = np.random.default_rng(3)
    parts = []
    for name, (rows, cols) in zip("gud", ((I, D), (I, D), (D, I))):
        raw = random_blocks(T.Q4_K, E * rows * cols // 256, rng).reshape(E, rows, -1)
        parts.append(GGUFTensor(name, None, T.Q4_K, (E, rows, cols), raw))
    store = QuantStore({0: tuple(parts)})
    slots = torch.zeros(E, store.slot_nbytes(), dtype=torch.uint8)
    for e in range(E):
        store.copy_to_slot(slots, e, 0, e)
    slots = slots.to(DEVICE)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = store.compute_slots_prefill(slots, SLOT_IDS, 0, x, COUNTS, grouped=True)
    store.quant_gemm = {T.Q4_K}
    dequantized = []
    real = gpu.dequantize_slots
    monkeypatch.setattr(gpu, "dequantize_slots", lambda *a, **k: dequantized.append(a[3]) or real(*a, **k))
    got = store.compute_slots_prefill(slots, SLOT_IDS, 0, x, COUNTS, grouped=True)
    assert dequantized == []
    assert rel_error(got, want.float().cpu()) < 2 * TOL
