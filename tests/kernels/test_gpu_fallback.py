"""A GPU kernel that fails at its first call (e.g. Triton cannot compile it for this GPU) leaves the work to the
eager code, with one warning; after a first success, or for bad inputs, errors propagate."""
import warnings

import pytest
import torch

from hybridmoe.kernels import _FirstUse


def test_a_failing_first_call_warns_once_then_steps_aside() -> None:
    calls = []

    def broken(x):
        calls.append(x)
        raise RuntimeError("PassManager::run failed\nmore detail")

    k = _FirstUse("route.route", broken)
    with pytest.warns(RuntimeWarning, match=r"route.route failed at its first use \(RuntimeError: PassManager"):
        assert k(1) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert k(2) is None
    assert calls == [1]


def test_errors_after_a_success_and_input_errors_propagate() -> None:
    state = {"fail": False}

    def flaky(x):
        if state["fail"]:
            raise RuntimeError("later")
        return x + 1

    k = _FirstUse("norm.rms_norm", flaky)
    assert k(1) == 2
    state["fail"] = True
    with pytest.raises(RuntimeError, match="later"):
        k(1)

    def bad(x):
        raise ValueError("x must be contiguous")

    with pytest.raises(ValueError, match="contiguous"):
        _FirstUse("rope.rope", bad)(1)
    with pytest.raises(torch.OutOfMemoryError):
        _FirstUse("combine.combine", lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))(1)


def test_the_kernels_can_be_turned_off(monkeypatch) -> None:
    """HYBRIDMOE_GPU_KERNELS=0 (read at import into USE_GPU_KERNELS): every call site gets None, runs eager code."""
    import hybridmoe.kernels as kernels

    monkeypatch.setattr(kernels, "ALSO_ON_CPU", True)
    monkeypatch.setattr(kernels, "gpu_kernel", lambda module, name: f"{module}.{name}")
    t = torch.zeros(1)
    assert kernels.gpu_kernel_for(t, "norm", "rms_norm") == "norm.rms_norm"
    monkeypatch.setattr(kernels, "USE_GPU_KERNELS", False)
    assert kernels.gpu_kernel_for(t, "norm", "rms_norm") is None
