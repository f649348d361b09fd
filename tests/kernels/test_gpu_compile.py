"""The one-launch GPU kernels build for the target GPUs (sm_89: RTX 6000 Ada; sm_90: H100) without a GPU:
Triton compiles them to cubin with its bundled ptxas. The interpreter tests check their arithmetic; this checks
what only a real build catches (types, layouts, unsupported operations). The build runs in a child process:
kernels defined under TRITON_INTERPRET=1 (which other test modules set) cannot be compiled."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cases() -> list[tuple]:
    from hybridmoe.kernels.gpu.combine import combine_kernel
    from hybridmoe.kernels.gpu.norm import rms_norm_kernel
    from hybridmoe.kernels.gpu.rope import rope_kernel
    from hybridmoe.kernels.gpu.route import route_kernel, router_kernel

    route = {"logits": "*fp32", "bias": "*fp32", "ids_out": "*i64", "w_out": "*fp32", "E": "i32", "scaling": "fp32"}
    routings = {  # DeepSeek-V3; DeepSeek-V2 (groups of 20, padded); Qwen3 with the prefetcher's margin of 2
        "noaux_tc": dict(K=8, KB=8, G=8, GP=8, GROUP=32, GRP=32, TOPK_GROUP=4, SIGMOID=True, HAS_BIAS=True,
                         GROUPED=True, TOP2=True, FILL_ZERO=False, NORM=True, SCALE=True),
        "group_limited": dict(K=6, KB=8, G=8, GP=8, GROUP=20, GRP=32, TOPK_GROUP=3, SIGMOID=False, HAS_BIAS=False,
                              GROUPED=True, TOP2=False, FILL_ZERO=True, NORM=False, SCALE=True),
        "greedy_wide": dict(K=10, KB=16, G=1, GP=1, GROUP=128, GRP=128, TOPK_GROUP=1, SIGMOID=False,
                            HAS_BIAS=False, GROUPED=False, TOP2=False, FILL_ZERO=True, NORM=True, SCALE=False),
    }
    out = [(route_kernel, route, c, f"route-{n}") for n, c in routings.items()]
    for act in ("bf16", "fp16", "fp32"):
        out.append((router_kernel, {"x": f"*{act}", "w": "*fp32", "out": "*fp32", "E": "i32", "D": "i32",
                                    "sxn": "i32"}, {"BE": 4, "BD": 1024}, f"router-logits-{act}"))
    for act in ("bf16", "fp16", "fp32"):
        for res in (False, True):
            out.append((rms_norm_kernel, {"x": f"*{act}", "res": f"*{act}", "total": f"*{act}", "w": f"*{act}",
                                          "out": f"*{act}", "D": "i32", "eps": "fp32"},
                        {"BLOCK": 8192, "HAS_RES": res}, f"norm-{act}{'-residual' if res else ''}"))
        out.append((combine_kernel, {"parts": f"*{act}", "weights": "*fp32", "out": f"*{act}", "K": "i32",
                                     "D": "i32", "spn": "i32", "spk": "i32", "swn": "i32"},
                    {"BK": 8, "BD": 1024}, f"combine-{act}"))
        for interleaved in (False, True):
            sig = {"x": f"*{act}", "cos": "*fp32", "sin": "*fp32", "out": f"*{act}", "w": f"*{act}", "eps": "fp32",
                   **{k: "i32" for k in ("T", "H", "HALF", "sxb", "sxt", "sxh", "scb", "sct", "ssb", "sst")}}
            for norm in (False, True):
                out.append((rope_kernel, sig, {"INTERLEAVED": interleaved, "NORM": norm, "BH": 32, "BD": 64},
                            f"rope-{act}-{'interleaved' if interleaved else 'halves'}{'-norm' if norm else ''}"))
    out.append((rms_norm_kernel, {"x": "*bf16", "res": "*bf16", "total": "*fp32", "w": "*fp32", "out": "*fp32",
                                  "D": "i32", "eps": "fp32"}, {"BLOCK": 128, "HAS_RES": False},
                "norm-bf16-x-fp32-weight"))
    from hybridmoe.kernels.gpu.moe_gemm import BLOCK_M, BLOCK_N, grouped_kernel
    for act in ("bf16", "fp32"):
        for fused in (False, True):
            out.append((grouped_kernel, {"x": f"*{act}", "w": "*u8", "w2": "*u8", "y": "*bf16", "ids": "*i32",
                                         "tiles": "*i32", **{k: "i32" for k in ("n_kb", "N", "row_bytes",
                                                                                "stride_we", "stride_x", "stride_y")}},
                        {"FUSED": fused, "BM": BLOCK_M, "BN": BLOCK_N, "BF16": True},
                        f"moe-gemm-q4_k-{act}{'-gate-up' if fused else ''}"))
    return out


def build_all(arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for kernel, signature, constexprs, name in cases():
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            assert compiled.asm["cubin"], "no cubin"
        except Exception as err:  # report every kernel that does not build, not only the first
            failed += 1
            print(f"{name} (sm_{arch}): {type(err).__name__}: {err}")
    return failed


@pytest.mark.parametrize("arch", [89, 90])
def test_builds_for_the_target_gpus(arch: int) -> None:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton has no CUDA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set so that triton does not warn about it
    run = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(min(1, build_all(int(sys.argv[1]))))
