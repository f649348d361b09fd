"""Machine readings for the monitor: RAM and CPU (psutil), VRAM and utilisation per GPU (nvidia-ml-py, optional)."""
from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    mem_used: int  # bytes
    mem_total: int
    util: int  # percent


@dataclass(frozen=True, slots=True)
class Reading:
    ram_used: int  # bytes
    ram_total: int
    cpu_percent: float
    gpus: tuple[GpuReading, ...] = ()
    gpu_note: str = "no GPU"  # why there are no GPU readings


class SystemProbe:
    """Reads the machine once per call of read(). Without nvidia-ml-py or an NVIDIA driver it reports "no GPU"."""

    def __init__(self):
        self._nvml = None
        self._handles: list = []
        self.gpu_note = "no GPU"
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except ImportError:
            self.gpu_note = "no GPU (nvidia-ml-py not installed)"
        except Exception:  # NVMLError and friends: no driver, no device; the machine simply has no GPU to show
            self._handles = []
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def read(self) -> Reading:
        vm = psutil.virtual_memory()
        gpus = []
        for i, h in enumerate(self._handles):
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                util = self._nvml.nvmlDeviceGetUtilizationRates(h).gpu
                name = self._nvml.nvmlDeviceGetName(h)
            except Exception:  # a GPU that stops answering is left out rather than ending the app
                continue
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GpuReading(i, name, int(mem.used), int(mem.total), int(util)))
        return Reading(int(vm.total - vm.available), int(vm.total), psutil.cpu_percent(interval=None), tuple(gpus),
                       self.gpu_note)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
