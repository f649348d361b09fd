"""Parity of the Triton kernels with the `hybridmoe.quant` numpy reference.

On a machine with CUDA they run on the GPU; elsewhere Triton's interpreter runs them on CPU tensors (slow, so the
matrices here are small). Skipped when triton is not installed.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels import gpu  # noqa: E402
from hybridmoe.quant import dequantize, get_format, random_blocks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
TOL = 1e-3  # float32 accumulation in another order than the float64 reference; seen ~1e-7


def raw_matrix(qtype: T, n_rows: int, n_cols: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Random raw rows on DEVICE and their float64 dequantization."""
    fmt = get_format(qtype)
    raw = random_blocks(qtype, n_rows * n_cols // fmt.block_size, rng).reshape(n_rows, -1)
    return torch.from_numpy(raw).to(DEVICE), dequantize(raw, qtype, (n_rows, n_cols)).astype(np.float64)


def rel_error(y: torch.Tensor, ref: np.ndarray) -> float:
    y = y.float().cpu().numpy()
    assert y.shape == ref.shape and np.isfinite(y).all()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_float32_is_bit_exact(qtype: T) -> None:
    raw, ref = raw_matrix(qtype, 6, 768, np.random.default_rng(1))  # 3 K-blocks: the block tile is partial
    out = gpu.dequantize(raw, qtype, (6, 768), dtype=torch.float32)
    assert out.dtype == torch.float32 and np.array_equal(out.cpu().numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_bfloat16_is_the_rounded_reference(qtype: T) -> None:
    raw, ref = raw_matrix(qtype, 5, 512, np.random.default_rng(2))
    out = gpu.dequantize(raw.view(-1), qtype, (5, 512))  # flat bytes, logical shape
    ref32 = torch.from_numpy(ref.astype(np.float32))
    assert out.dtype == torch.bfloat16 and out.shape == (5, 512)
    # within one bf16 step of the float32 value (the interpreter truncates; CUDA rounds to nearest even, as torch)
    assert ((out.cpu().float() - ref32).abs() <= ref32.abs() * 2.0**-7).all()
    if DEVICE.type == "cuda":
        assert torch.equal(out.cpu(), ref32.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 8])
def test_gemv_float32(qtype: T, n_tokens: int) -> None:
    rng = np.random.default_rng(n_tokens)
    w, ref = raw_matrix(qtype, 20, 512, rng)  # 20 rows: the last row tile is partial
    x = rng.standard_normal((n_tokens, 512)).astype(np.float32)
    y = gpu.gemv(torch.from_numpy(x).to(DEVICE), w, qtype)
    assert y.dtype == torch.float32 and y.shape == (n_tokens, 20)
    assert rel_error(y, x.astype(np.float64) @ ref.T) < TOL


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0], ids=lambda q: q.name)
def test_gemv_bfloat16_activations(qtype: T) -> None:
    rng = np.random.default_rng(3)
    w, ref = raw_matrix(qtype, 16, 256, rng)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expect = x.double().numpy() @ ref.T
    assert rel_error(gpu.gemv(x.to(DEVICE), w, qtype, out_dtype=torch.float32), expect) < TOL
    y = gpu.gemv(x.to(DEVICE), w, qtype)
    assert y.dtype == torch.bfloat16 and rel_error(y, expect) < 1e-2  # bf16 output rounding


def test_gemv_odd_block_count_and_explicit_tiles() -> None:
    rng = np.random.default_rng(4)
    w, ref = raw_matrix(T.Q8_0, 9, 32 * 7, rng)  # 7 blocks per row, 9 rows: tiles of 4 rows overhang
    x = rng.standard_normal((2, 224)).astype(np.float32)
    y = gpu.gemv(torch.from_numpy(x).to(DEVICE), w, T.Q8_0, config={"R": 4, "BB": 1, "num_warps": 1})
    assert rel_error(y, x.astype(np.float64) @ ref.T) < TOL
    with pytest.raises(ValueError, match="BB = 2 does not divide the 7 blocks"):
        gpu.gemv(torch.from_numpy(x).to(DEVICE), w, T.Q8_0, config={"R": 4, "BB": 2, "num_warps": 1})


def test_grouped_gemv_picks_matrices_by_id() -> None:
    rng = np.random.default_rng(5)
    mats = [raw_matrix(T.Q4_K, 8, 256, rng) for _ in range(3)]
    w = torch.stack([m[0] for m in mats])  # [E, N, rb]
    ids = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    x = rng.standard_normal((2, 1, 256)).astype(np.float32)  # one token per selected matrix
    y = gpu.gemv(torch.from_numpy(x).to(DEVICE), w, T.Q4_K, ids=ids)
    assert y.shape == (2, 1, 8)
    for g, e in enumerate([2, 0]):
        assert rel_error(y[g], x[g].astype(np.float64) @ mats[e][1].T) < TOL
    shared = gpu.gemv(torch.from_numpy(x[0]).to(DEVICE), w, T.Q4_K, ids=ids)  # x [n, K] shared by all ids
    assert rel_error(shared[1], x[0].astype(np.float64) @ mats[0][1].T) < TOL


def ffn_reference(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    g, u = x @ gate.T, x @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


@pytest.fixture(scope="module")
def experts():
    """Three experts, D = 512, I = 256: gate/up Q4_K and down Q6_K (a Q4_K_M file's mix), in slots."""
    rng = np.random.default_rng(6)
    layout = gpu.SlotLayout(512, 256, T.Q4_K, T.Q4_K, T.Q6_K)
    raws, refs = [], []
    for _ in range(3):
        parts = [raw_matrix(T.Q4_K, 256, 512, rng), raw_matrix(T.Q4_K, 256, 512, rng),
                 raw_matrix(T.Q6_K, 512, 256, rng)]
        raws.append(tuple(p[0] for p in parts))
        refs.append(tuple(p[1] for p in parts))
    slots = torch.stack([layout.pack(*[r.cpu() for r in raw]) for raw in raws]).to(DEVICE)
    return layout, raws, refs, slots


def test_slot_layout_is_aligned_and_round_trips(experts) -> None:
    layout, raws, _, slots = experts
    assert layout.gate_offset == 0 and layout.nbytes % gpu.ALIGN == 0
    assert layout.up_offset % gpu.ALIGN == 0 and layout.down_offset % gpu.ALIGN == 0
    assert layout.down_offset >= layout.up_offset + layout.up_nbytes
    for view, raw in zip(layout.views(slots[1]), raws[1]):
        assert torch.equal(view, raw)


def test_expert_ffn_from_slot_and_from_raw(experts) -> None:
    layout, raws, refs, slots = experts
    x = np.random.default_rng(7).standard_normal((2, 512)).astype(np.float32)
    expect = ffn_reference(x.astype(np.float64), *refs[1])
    xt = torch.from_numpy(x).to(DEVICE)
    assert rel_error(gpu.expert_ffn(xt, slots[1], layout), expect) < TOL
    assert rel_error(gpu.expert_ffn(xt, raws[1], layout), expect) < TOL


def test_experts_ffn_one_launch_for_several_slots(experts) -> None:
    layout, _, refs, slots = experts
    x = np.random.default_rng(8).standard_normal((1, 512)).astype(np.float32)
    ids = torch.tensor([2, 0, 1], dtype=torch.int64, device=DEVICE)
    y = gpu.experts_ffn(torch.from_numpy(x).to(DEVICE), slots, ids, layout)
    assert y.shape == (3, 1, 512)
    for g, e in enumerate([2, 0, 1]):
        assert rel_error(y[g], ffn_reference(x.astype(np.float64), *refs[e])) < TOL


def test_experts_ffn_skips_negative_slot_ids(experts) -> None:
    """A negative id is an expert computed elsewhere (the CPU): nothing is read for it and its rows stay as they
    were; the others are computed as usual."""
    layout, _, refs, slots = experts
    x = np.random.default_rng(10).standard_normal((1, 512)).astype(np.float32)
    ids = torch.tensor([1, -1, 2, -1], dtype=torch.int32, device=DEVICE)
    y = gpu.experts_ffn(torch.from_numpy(x).to(DEVICE), slots, ids, layout)
    assert y.shape == (4, 1, 512)
    for g, e in ((0, 1), (2, 2)):
        assert rel_error(y[g], ffn_reference(x.astype(np.float64), *refs[e])) < TOL


def test_expert_ffn_gate_and_up_of_different_types() -> None:
    rng = np.random.default_rng(9)
    layout = gpu.SlotLayout(256, 256, T.Q4_K, T.Q8_0, T.Q4_0)
    parts = [raw_matrix(T.Q4_K, 256, 256, rng), raw_matrix(T.Q8_0, 256, 256, rng), raw_matrix(T.Q4_0, 256, 256, rng)]
    slot = layout.pack(*[p[0].cpu() for p in parts]).to(DEVICE)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    y = gpu.expert_ffn(torch.from_numpy(x).to(DEVICE), slot, layout)
    assert rel_error(y, ffn_reference(x.astype(np.float64), *[p[1] for p in parts])) < TOL


@pytest.mark.parametrize("types,dtype", [((T.Q4_K, T.Q8_0, T.Q6_K), torch.float32),
                                         ((T.Q5_K, T.Q4_0, T.Q4_K), torch.bfloat16)], ids=["f32", "bf16"])
def test_dequantize_slots_is_each_matrix_dequantized(types, dtype) -> None:
    """One launch per projection for several slots equals `dequantize` of each slot's view, bit for bit."""
    rng = np.random.default_rng(12)
    layout = gpu.SlotLayout(256, 512, *types)
    shapes = ((512, 256), (512, 256), (256, 512))
    slots = torch.zeros(3, layout.nbytes + gpu.ALIGN, dtype=torch.uint8)  # rows wider than this layout's experts
    for s in range(3):
        layout.pack(*[raw_matrix(q, *shp, rng)[0].cpu() for q, shp in zip(types, shapes)],
                    out=slots[s, :layout.nbytes])
    slots = slots.to(DEVICE)
    ids = torch.tensor([2, 0, 2], device=DEVICE)  # any order, repeats allowed
    scratch = torch.empty(3 * 512 * 256, dtype=dtype, device=DEVICE)  # one buffer for the three projections
    for p, (part, qtype, shp) in enumerate(zip(gpu.ffn.PARTS, types, shapes)):
        got = gpu.dequantize_slots(slots, ids, layout, part, dtype, out=scratch.view(3, *shp))
        assert got.shape == (3, *shp) and got.data_ptr() == scratch.data_ptr()
        for g, s in enumerate(ids.tolist()):
            want = gpu.dequantize(layout.views(slots[s, :layout.nbytes])[p], qtype, shp, dtype)
            assert torch.equal(got[g], want), (part, g)


def test_matmul_for_prefill() -> None:
    rng = np.random.default_rng(10)
    w, ref = raw_matrix(T.Q6_K, 8, 256, rng)
    x = rng.standard_normal((12, 256)).astype(np.float32)
    y = gpu.matmul(torch.from_numpy(x).to(DEVICE), w, T.Q6_K)
    assert y.shape == (12, 8) and rel_error(y, x.astype(np.float64) @ ref.T) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="expert-sized matrices are too slow for the interpreter")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(2048, 7168), (7168, 2048)])
def test_gemv_expert_sized(qtype: T, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(11)
    w, ref = raw_matrix(qtype, *shape, rng)
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    assert rel_error(gpu.gemv(torch.from_numpy(x).to(DEVICE), w, qtype), x.astype(np.float64) @ ref.T) < TOL
    out = gpu.dequantize(w, qtype, shape, dtype=torch.float32)
    assert np.array_equal(out.cpu().numpy(), ref.astype(np.float32))
