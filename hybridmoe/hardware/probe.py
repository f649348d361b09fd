"""What this machine has: GPUs (torch / nvml), RAM and CPU cores (psutil). Works without GPUs."""
from __future__ import annotations

import os

from ..offload.plan import GPU, Hardware


def probe_gpus() -> list[GPU]:
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(GPU(torch.cuda.get_device_name(i), total, free))
        return out
    except Exception:  # a broken driver must not stop CPU-only use
        return []


def probe() -> Hardware:
    import psutil
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return Hardware(tuple(probe_gpus()), vm.total, vm.available, cores)
