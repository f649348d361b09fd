"""The GPU wrappers refuse bad inputs with a ValueError that names the problem, before any launch."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels import gpu  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
Q4K_ROW = 144  # bytes of one Q4_K block: a row of K = 256


def weight(rows: int = 4, row_bytes: int = Q4K_ROW) -> torch.Tensor:
    return torch.zeros(rows, row_bytes, dtype=torch.uint8, device=DEVICE)


def x(n: int = 1, k: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(n, k, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("call, message", [
    (lambda: gpu.gemv(x(), weight(), T.Q2_K), "no GPU kernel for GGML type Q2_K"),
    (lambda: gpu.gemv(x(dtype=torch.int32), weight(), T.Q4_K), "x must be float32, bfloat16 or float16"),
    (lambda: gpu.gemv(x(9), weight(), T.Q4_K), "at most 8"),
    (lambda: gpu.gemv(x(k=512), weight(), T.Q4_K), "x has K = 512, the weight has 256 columns"),
    (lambda: gpu.gemv(x(2).T.contiguous().T, weight(), T.Q4_K), "x must be contiguous"),
    (lambda: gpu.gemv(x(), weight().float(), T.Q4_K), "must hold raw GGUF bytes as uint8"),
    (lambda: gpu.gemv(x(), weight(row_bytes=140), T.Q4_K), "not a whole number of Q4_K blocks"),
    (lambda: gpu.gemv(x(), weight(row_bytes=288)[:, :144], T.Q4_K), "w must be contiguous"),
    (lambda: gpu.gemv(x(), weight().view(-1)[2:146].view(1, 144), T.Q4_K), "4-byte aligned"),
    (lambda: gpu.gemv(x(), weight()[None], T.Q4_K), "must have 2 dims"),
    (lambda: gpu.gemv(x(), weight()[None], T.Q4_K, ids=torch.tensor([0.5], device=DEVICE)), "int32/int64"),
    (lambda: gpu.gemv(x().expand(2, 1, 256).contiguous(), weight()[None], T.Q4_K,
                      ids=torch.zeros(3, dtype=torch.int32, device=DEVICE)), "activations for 3 ids"),
    (lambda: gpu.gemv(x(), weight(), T.Q4_K, out_dtype=torch.int8), "out_dtype must be"),
    (lambda: gpu.dequantize(weight(), T.Q4_K, (4, 512)), "576 bytes given, shape (4, 512) needs 1152"),
    (lambda: gpu.dequantize(weight(), T.Q4_K, (4, 100)), "not a positive multiple of block size 256"),
    (lambda: gpu.dequantize(weight(), T.Q4_K, (4, 256), dtype=torch.int32), "out_dtype must be"),
])
def test_bad_inputs_name_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="only the interpreter accepts CPU tensors")
def test_cpu_tensors_need_the_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        gpu.gemv(x(), weight(), T.Q4_K)


def test_slot_layout_checks() -> None:
    small = gpu.SlotLayout(64, 32, T.Q8_0, T.Q8_0, T.Q8_0)  # parts of 32 * 68 and 64 * 34 bytes, padded
    assert (small.up_offset, small.down_offset, small.nbytes) == (2304, 4608, 6912)
    layout = gpu.SlotLayout(256, 256, T.Q4_K, T.Q4_K, T.Q8_0)
    with pytest.raises(ValueError, match="not a multiple of 256"):
        gpu.SlotLayout(100, 256, T.Q4_K, T.Q4_K, T.Q4_K)
    with pytest.raises(ValueError, match="no GPU kernel for GGML type IQ4_XS"):
        gpu.SlotLayout(256, 256, T.IQ4_XS, T.Q4_K, T.Q4_K)
    with pytest.raises(ValueError, match=f"a slot is uint8 \\[{layout.nbytes}\\]"):
        gpu.expert_ffn(x(), torch.zeros(layout.nbytes + 1, dtype=torch.uint8, device=DEVICE), layout)
    slots = torch.zeros(2, layout.nbytes, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="slots must be uint8"):
        gpu.experts_ffn(x(), slots[:, :-256], torch.zeros(1, dtype=torch.int32, device=DEVICE), layout)
    with pytest.raises(ValueError, match="x has K = 512"):
        gpu.experts_ffn(x(k=512), slots, torch.zeros(1, dtype=torch.int32, device=DEVICE), layout)
    with pytest.raises(ValueError, match="down has 4 rows, the layout says 256"):
        gpu.expert_ffn(x(), (weight(256), weight(256), weight(4, 272)), layout)
    ids = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="part must be one of gate, up, down"):
        gpu.dequantize_slots(slots, ids, layout, "w2")
    with pytest.raises(ValueError, match=f"slots must be uint8 \\[n_slots, >= {layout.nbytes}\\]"):
        gpu.dequantize_slots(slots[:, :-256], ids, layout, "gate")
    with pytest.raises(ValueError, match="out must be torch.bfloat16 \\(2, 256, 256\\)"):
        gpu.dequantize_slots(slots, ids, layout, "up", out=torch.empty(1, 256, 256, device=DEVICE))
