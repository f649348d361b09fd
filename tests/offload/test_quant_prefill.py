"""Prefill of GGUF experts in GPU slots: QuantStore.compute_slots_prefill runs chunks of experts through one grouped
dequantization per projection and grouped matrix products, and must give what each expert gives on its own.

On a machine with CUDA it runs on the GPU; elsewhere Triton's interpreter runs the kernels on CPU tensors.
"""
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.formats.gguf import GGUFTensor  # noqa: E402
from hybridmoe.kernels import gpu  # noqa: E402
from hybridmoe.offload.quant_store import QuantStore  # noqa: E402
from hybridmoe.quant import get_format, random_blocks  # noqa: E402

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
D, I, E = 256, 512, 5
# Layer 0 mixes types (Q4_K gate and up, Q8_0 down); layer 1 is all Q8_0, a larger expert, so layer 0's experts
# sit in wider slot rows.
TYPES = {0: (T.Q4_K, T.Q4_K, T.Q8_0), 1: (T.Q8_0, T.Q8_0, T.Q8_0)}
SHAPES = ((I, D), (I, D), (D, I))  # gate, up, down
SLOT_IDS = [4, 0, 2, 3]  # any order: slot s holds expert s
COUNTS = [9, 1, 3, 12]  # uneven, one expert with a single token, some above the GEMV kernels' 8
# Against the float32 CPU kernels: x, the weights, the gate/up outputs, h and the output are each rounded to bf16,
# within 2^-8 of their values (2^-7 for the weights under the interpreter, which truncates). Seen: 1.1e-2 of the
# largest output under the interpreter. A wrong expert, token, row order or chunk boundary gives errors of order 1.
TOL = 2.0**-5
# Against the same bf16 arithmetic one expert at a time: only the matrix products' summation order may differ
# (on CUDA; on the CPU the results are equal), which moves a bf16 rounding by a step.
TOL_BF16 = 2.0**-7


def tensor(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> GGUFTensor:
    nb = E * rows * cols // get_format(qtype).block_size
    raw = random_blocks(qtype, nb, rng).reshape(E, rows, -1)
    return GGUFTensor(f"{qtype.name}.{rows}x{cols}", None, qtype, (E, rows, cols), raw)


def make_store() -> tuple[QuantStore, dict[int, torch.Tensor]]:
    """A store of two layers and a slot buffer per layer (on the CPU) holding its E experts (slot s = expert s)."""
    rng = np.random.default_rng(0)
    layers = {layer: tuple(tensor(q, *shp, rng) for q, shp in zip(types, SHAPES)) for layer, types in TYPES.items()}
    store = QuantStore(layers)
    buffers = {}
    for layer in layers:
        buffers[layer] = torch.zeros(E, store.slot_nbytes(), dtype=torch.uint8)
        for e in range(E):
            store.copy_to_slot(buffers[layer], e, layer, e)
    return store, buffers


STORE = make_store()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(seed))


@functools.cache
def references(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, each expert by compute_slot with the CPU kernels in float32, each expert as compute_slot computes it on
    CUDA past 8 tokens: each matrix dequantized to bf16, then F.linear)."""
    store, buffers = STORE
    x, rows, lay = tokens(), buffers[layer], store.layouts[layer].gpu
    f32 = torch.cat([store.compute_slot(rows, s, layer, xe) for s, xe in zip(SLOT_IDS, x.split(COUNTS))])
    ys = []
    for s, xe in zip(SLOT_IDS, x.split(COUNTS)):
        row = rows[s, :lay.nbytes].to(DEVICE)
        g, u, d = (gpu.dequantize(raw, q, shp) for raw, q, shp in zip(lay.views(row), TYPES[layer], SHAPES))
        xb = xe.to(DEVICE, torch.bfloat16)
        ys.append(F.linear(F.silu(F.linear(xb, g)) * F.linear(xb, u), d))
    return x, f32, torch.cat(ys).to(x.dtype).cpu()


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and torch.isfinite(y).all()
    return float((y.cpu().float() - ref.float()).abs().max() / ref.float().abs().max())


def prefill(layer: int, x: torch.Tensor, n_experts: int = len(SLOT_IDS), **kwargs) -> torch.Tensor:
    """The first n_experts of SLOT_IDS on their rows of x, grouped."""
    store, buffers = STORE
    counts = COUNTS[:n_experts]
    return store.compute_slots_prefill(buffers[layer].to(DEVICE), SLOT_IDS[:n_experts], layer,
                                       x[:sum(counts)].to(DEVICE), counts, grouped=True, **kwargs)


@pytest.mark.parametrize("layer,chunk", [(0, None), (0, 3), (1, 1)], ids=["q4_k_m", "q4_k_m-chunks_of_3",
                                                                          "q8_0-chunks_of_1"])
def test_grouped_prefill_matches_each_expert(layer: int, chunk: int | None) -> None:
    x, f32, bf16 = references(layer)
    scratch = {} if chunk is None else {"scratch_bytes": chunk * I * D * 2}  # bf16 bytes of `chunk` projections
    y = prefill(layer, x, **scratch)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_error(y, f32) < TOL
    assert rel_error(y, bf16) < TOL_BF16


def test_without_grouped_mm_each_expert_takes_a_linear(monkeypatch) -> None:
    """Where torch._grouped_mm fails at its first use (CUDA before sm90), the same scratch goes through one F.linear
    per expert from then on, with a warning: then the result is the per-expert bf16 one, bit for bit."""
    x, _, bf16 = references(1)
    calls = []

    def unsupported(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("grouped gemm is not supported on this device")

    monkeypatch.setattr(STORE[0], "grouped_mm_ok", {})
    monkeypatch.setattr(torch, "_grouped_mm", unsupported)
    with pytest.warns(RuntimeWarning, match="not supported on this device"):
        y = prefill(1, x, 2)
    assert list(STORE[0].grouped_mm_ok.values()) == [False] and len(calls) == 1  # keyed by cuda:0 on CUDA
    assert torch.equal(y.cpu(), bf16[:y.shape[0]])
    prefill(1, x, 1)
    assert len(calls) == 1  # not tried again on that device


def test_grouped_mm_errors_after_a_first_success_are_raised(monkeypatch) -> None:
    def failing(*args, **kwargs):
        raise RuntimeError("a later failure")

    monkeypatch.setattr(STORE[0], "grouped_mm_ok", {DEVICE: True})
    monkeypatch.setattr(torch, "_grouped_mm", failing)
    with pytest.raises(RuntimeError, match="a later failure"):
        prefill(1, tokens(), 1)


def test_without_grouping_each_expert_runs_as_compute_slot() -> None:
    """The CPU standing in for the GPU: compute_slot per expert, bit for bit."""
    store, buffers = STORE
    x, f32, _ = references(1)
    assert torch.equal(store.compute_slots_prefill(buffers[1], SLOT_IDS, 1, x, COUNTS), f32)
    with pytest.raises(ValueError, match="3 token counts summing to 13 for 4 slots and 25 rows"):
        store.compute_slots_prefill(buffers[1], SLOT_IDS, 1, x, COUNTS[:3])


@pytest.mark.parametrize("layer", [0, 1], ids=["q4_k-gate-up-from-blocks", "q8_0-dequantized"])
def test_types_chosen_for_the_quantized_gemm_read_the_blocks(layer, monkeypatch):
    """With Q4_K in quant_gemm, layer 0's gate and up (Q4_K) run as one grouped product from the blocks and its Q8_0
    down as before; layer 1 (Q8_0) is unchanged. Either way, each expert's rows come back as the per-expert bf16
    path gives them, within a bf16 step."""
    store = STORE[0]
    monkeypatch.setattr(store, "quant_gemm", {T.Q4_K})
    calls = []
    fused = gpu.grouped_gate_up
    monkeypatch.setattr(gpu, "grouped_gate_up", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x, f32, bf16 = references(layer)
    y = prefill(layer, x)
    assert len(calls) == (layer == 0)
    assert rel_error(y, f32) < TOL
    assert rel_error(y, bf16) < TOL_BF16
