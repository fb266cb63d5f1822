"""What this machine is: the torch device to use, the CPU's name and vector ISA (recorded with every benchmark)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

import torch

# The x86 flags that decide which kernels a CPU can run, best first (as /proc/cpuinfo names them).
ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx2", "fma", "f16c")


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:i]'; a clear error for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:i]; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:i]; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to this torch ({torch.__version__})")
    return device


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """Vendor, family, model and stepping (e.g. 'AuthenticAMD family 23 model 49 stepping 0', a Zen 2): VMs name
    their CPU 'AMD EPYC' whatever its generation, and the generation decides what INT8 and AVX-512 buy."""
    fields = {}
    for line in _cpuinfo().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "cpu family" not in fields:
        return None
    return (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields.get('model', '?')}"
            f" stepping {fields.get('stepping', '?')}")


def cpu_isa() -> list[str]:
    """The kernel-relevant vector ISA flags of this CPU (empty where /proc/cpuinfo is not readable)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in flags]
    return []


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """A folder-safe name of the device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-7b13-avx512-2c' (the widest
    vector ISA: VMs of one CPU name come with and without AVX-512)."""
    isa = next((f for f in ("avx512f", "avx2") if f in cpu_isa()), None)
    cpu = f"cpu-{cpu_model()}-{isa.removesuffix('f') + '-' if isa else ''}{os.cpu_count()}c"
    name = device_name(device) if device.type == "cuda" else cpu
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_info(device: torch.device) -> dict:
    """Everything a result file must say about where it was measured."""
    from . import __version__

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "os": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(), "cpu_id": cpu_id(),
            "cpu_isa": cpu_isa(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "fastdiff": __version__, "device": str(device),
            "device_name": device_name(device), "gpu": device_name(device) if device.type == "cuda" else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu_memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
                     "compute_capability": f"{p.major}.{p.minor}",
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})
    return info
