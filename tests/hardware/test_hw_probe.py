"""Probing the machine: works without GPUs, parses /proc/cpuinfo, reads GPUs through nvml, times the disk."""
import sys
import types

import pytest

from hybridmoe.hardware import probe as P
from hybridmoe.offload.plan import GiB, Hardware

CPUINFO = """processor\t: 0
model name\t: AMD Ryzen Threadripper PRO 7975WX 32-Cores
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_tile
processor\t: 1
model name\t: AMD Ryzen Threadripper PRO 7975WX 32-Cores
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_tile
"""


def test_probe_runs_on_this_machine_and_feeds_plan():
    m = P.probe_machine()
    assert m.cpu.cores >= 1 and m.ram_total >= m.ram_available > 0
    hw = m.hardware()
    assert isinstance(hw, Hardware) and len(hw.gpus) == len(m.gpus)
    text = "\n".join(m.describe())
    assert "CPU:" in text and "RAM:" in text
    if not m.gpus:  # says so plainly
        assert "GPU: none" in text and any("no CUDA GPU" in n for n in m.notes)
    assert isinstance(P.probe(), Hardware)


def test_cpu_flags_model_and_numa_nodes(tmp_path):
    for n in range(2):
        (tmp_path / f"node{n}").mkdir()
    (tmp_path / "possible").write_text("0-1")
    cpu = P.probe_cpu(CPUINFO, str(tmp_path))
    assert cpu.model.startswith("AMD Ryzen Threadripper PRO")
    assert cpu.numa_nodes == 2
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile"} <= set(cpu.flags)
    assert "avx512_vnni" not in cpu.flags and "sse2" not in cpu.flags
    assert P.probe_cpu("", str(tmp_path / "missing")).numa_nodes == 1


def _fake_nvml(gpus):
    """A stand-in for the pynvml module: (name, total, free, (major, minor), gen, width) per GPU."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: gpus[h][0].encode()
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][1], free=gpus[h][2])
    m.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h][3]
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: gpus[h][4]
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: gpus[h][5]
    return m


def test_gpus_through_nvml_with_pcie_links_and_visible_devices(monkeypatch):
    ada = ("NVIDIA RTX 6000 Ada Generation", 48 * GiB, 47 * GiB, (8, 9), 4, 16)
    h100 = ("NVIDIA H100 PCIe", 80 * GiB, 79 * GiB, (9, 0), 5, 16)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([ada, ada, h100]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = P.probe_gpus()
    assert [g.name for g in gpus] == [ada[0], ada[0], h100[0]]
    assert (gpus[0].compute_capability, gpus[0].pcie_gen, gpus[0].pcie_width) == ("8.9", 4, 16)
    assert gpus[2].bytes_total == 80 * GiB and gpus[2].source == "nvml"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    gpus = P.probe_gpus()
    assert [(g.index, g.name) for g in gpus] == [(0, h100[0]), (1, ada[0])]
    m = P.probe_machine()
    assert "PCIe 5.0 x16" in m.describe()[0]


def test_broken_nvml_falls_back_without_raising(monkeypatch):
    broken = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("driver not loaded")
    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert isinstance(P.probe_gpus(), list)


def test_disk_read_rate_of_a_file_and_of_a_folder(tmp_path):
    f = tmp_path / "shard.bin"
    f.write_bytes(b"\1" * (4 << 20))
    assert P.measure_disk_read(f, max_bytes=4 << 20, chunk=1 << 20) > 0
    # a folder with nothing large in it: a temporary file is written, timed and removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert P.measure_disk_read(empty, max_bytes=2 << 20, chunk=1 << 20) > 0
    assert list(empty.iterdir()) == []
    m = P.probe_machine(f, measure_disk=True)
    assert m.disk.path == str(tmp_path) and m.disk.bytes_free > 0


@pytest.mark.parametrize("rates", [{}, {"h2d_bytes_per_s": 54e9, "cpu_read_bytes_per_s": 87e9}])
def test_machine_hardware_rates(rates):
    m = P.probe_machine()
    hw = m.hardware(**rates)
    for k, v in rates.items():
        assert getattr(hw, k) == v
