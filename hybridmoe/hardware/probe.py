"""What this machine has: GPUs (nvml, else torch), CPU cores, NUMA nodes and vector flags (/proc/cpuinfo), RAM
(psutil), and the free space and read rate of the disk that holds the model. Works, and says so, without GPUs."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..offload.plan import GPU, GiB, Hardware

# Flags that decide which CPU kernels can run fast; the rest of /proc/cpuinfo's list is noise for us.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")


@dataclass(frozen=True, slots=True)
class GPUInfo:
    index: int
    name: str
    bytes_total: int
    bytes_free: int
    compute_capability: str = ""  # "8.9"
    pcie_gen: int = 0  # 0: unknown
    pcie_width: int = 0
    source: str = "nvml"  # "nvml" or "torch"

    def as_gpu(self) -> GPU:
        return GPU(self.name, self.bytes_total, self.bytes_free)


@dataclass(frozen=True, slots=True)
class CPUInfo:
    model: str
    cores: int  # physical
    threads: int  # logical
    numa_nodes: int
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DiskInfo:
    path: str
    bytes_free: int
    read_bytes_per_s: float | None = None  # None: not measured


@dataclass(frozen=True, slots=True)
class Machine:
    gpus: tuple[GPUInfo, ...]
    cpu: CPUInfo
    ram_total: int
    ram_available: int
    disk: DiskInfo | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def hardware(self, h2d_bytes_per_s: float | None = None, cpu_read_bytes_per_s: float | None = None) -> Hardware:
        """plan.Hardware for make_plan; rates not given keep Hardware's defaults."""
        rates = {}
        if h2d_bytes_per_s:
            rates["h2d_bytes_per_s"] = h2d_bytes_per_s
        if cpu_read_bytes_per_s:
            rates["cpu_read_bytes_per_s"] = cpu_read_bytes_per_s
        if self.disk and self.disk.read_bytes_per_s:
            rates["disk_read_bytes_per_s"] = self.disk.read_bytes_per_s
        return Hardware(tuple(g.as_gpu() for g in self.gpus), self.ram_total, self.ram_available, self.cpu.cores,
                        **rates)

    def describe(self) -> list[str]:
        lines = []
        for g in self.gpus:
            link = f", PCIe {g.pcie_gen}.0 x{g.pcie_width}" if g.pcie_gen else ""
            cc = f", compute {g.compute_capability}" if g.compute_capability else ""
            lines.append(f"GPU {g.index}: {g.name}, {g.bytes_total / GiB:.1f} GiB ({g.bytes_free / GiB:.1f} free)"
                         f"{cc}{link}")
        if not self.gpus:
            lines.append("GPU: none")
        c = self.cpu
        lines.append(f"CPU: {c.model or 'unknown'}, {c.cores} cores / {c.threads} threads, {c.numa_nodes} NUMA "
                     f"node(s), flags: {' '.join(c.flags) or 'none of ' + '/'.join(CPU_FLAGS[:4])}")
        lines.append(f"RAM: {self.ram_total / GiB:.1f} GiB ({self.ram_available / GiB:.1f} available)")
        if self.disk:
            rate = (f", reads {self.disk.read_bytes_per_s / 1e9:.2f} GB/s" if self.disk.read_bytes_per_s else "")
            lines.append(f"disk at {self.disk.path}: {self.disk.bytes_free / GiB:.0f} GiB free{rate}")
        return lines + [f"note: {n}" for n in self.notes]


def _nvml_gpus(notes: list[str]) -> list[GPUInfo] | None:
    """All GPUs through nvml, or None when nvml is missing or has no driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no package, no driver, or a container without the library
        return None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            cc = gen = width = 0
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
                # The current link drops to gen 1 at idle to save power; the max is what copies will get.
                gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
                width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
            except Exception:  # some boards (SXM, virtual GPUs) do not report PCIe links
                pass
            out.append(GPUInfo(i, name, int(mem.total), int(mem.free), cc or "", int(gen), int(width), "nvml"))
        # nvml sees every GPU in PCI order; the run sees only CUDA_VISIBLE_DEVICES (set CUDA_DEVICE_ORDER=PCI_BUS_ID
        # for the two orders to agree on mixed GPUs).
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and all(v.isdigit() for v in visible):
            out = [replace(out[int(v)], index=n) for n, v in enumerate(visible) if int(v) < len(out)]
        elif visible:
            notes.append("CUDA_VISIBLE_DEVICES names GPUs by UUID; listing every GPU nvml sees")
        return out
    except Exception as e:
        notes.append(f"nvml failed ({e}); asked torch instead")
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _torch_gpus() -> list[GPUInfo]:
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            p = torch.cuda.get_device_properties(i)
            out.append(GPUInfo(i, p.name, total, free, f"{p.major}.{p.minor}", source="torch"))
        return out
    except Exception:  # a broken driver must not stop CPU-only use
        return []


def probe_gpus(notes: list[str] | None = None) -> list[GPUInfo]:
    notes = [] if notes is None else notes
    gpus = _nvml_gpus(notes)
    return gpus if gpus is not None else _torch_gpus()


def probe_cpu(cpuinfo: str | None = None, node_dir: str = "/sys/devices/system/node") -> CPUInfo:
    import psutil
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    try:
        nodes = sum(1 for p in Path(node_dir).iterdir() if p.name[4:].isdigit() and p.name.startswith("node"))
    except OSError:
        nodes = 0
    threads = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    cores = psutil.cpu_count(logical=False) or threads
    return CPUInfo(model, cores, threads, max(1, nodes), tuple(f for f in CPU_FLAGS if f in flags))


def measure_disk_read(path: str | Path, max_bytes: int = 512 << 20, max_s: float = 5.0,
                      chunk: int = 16 << 20) -> float | None:
    """Bytes/s reading from the disk that holds `path`: its largest file (a model shard), or a temporary file
    written there. The file's pages are dropped from the page cache first so that the disk, not RAM, is timed."""
    path = Path(path)
    target, temp = _largest_file(path), None
    if target is None or target.stat().st_size < chunk:
        folder = path if path.is_dir() else path.parent
        try:
            fd, name = tempfile.mkstemp(prefix=".hybridmoe-disk-", dir=folder)
        except OSError:
            return None
        temp = target = Path(name)
        block = os.urandom(1 << 20) * (chunk >> 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, min(max_bytes, 256 << 20) // chunk)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    try:
        return _timed_read(target, max_bytes, max_s, chunk)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _largest_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    files = [p for p in path.iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size, default=None)


def _timed_read(target: Path, max_bytes: int, max_s: float, chunk: int) -> float | None:
    buf = bytearray(chunk)
    fd = os.open(target, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages only; no root needed
        done, t0 = 0, time.perf_counter()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while done < max_bytes and time.perf_counter() - t0 < max_s:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return done / dt if done and dt > 0 else None


def probe_machine(model_path: str | Path | None = None, measure_disk: bool = False) -> Machine:
    """Everything probe() knows plus CPU flags, NUMA nodes, PCIe links and the model's disk."""
    import psutil
    notes: list[str] = []
    gpus = tuple(probe_gpus(notes))
    if not gpus:
        notes.append("no CUDA GPU found (no driver, or a CPU-only torch): plans and measurements are CPU-only")
    vm = psutil.virtual_memory()
    disk = None
    where = Path(model_path) if model_path else Path.cwd()
    folder = where if where.is_dir() else where.parent
    if folder.exists():
        rate = measure_disk_read(where) if measure_disk else None
        disk = DiskInfo(str(folder), shutil.disk_usage(folder).free, rate)
    return Machine(gpus, probe_cpu(), vm.total, vm.available, disk, tuple(notes))


def probe() -> Hardware:
    return probe_machine().hardware()
