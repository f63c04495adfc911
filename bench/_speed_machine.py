"""Which machine a ``bench/train_speed.py`` run measured: CPU, GPUs (name, count, driver), library versions.

GPU facts come from NVML (``pynvml``), else ``nvidia-smi``, so the orchestrator never creates a CUDA
context of its own; the trainers add ``torch.cuda.get_device_name`` to each job's result.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def visible_gpus() -> list[str]:
    """Physical ids (or UUIDs) of the GPUs this process may use, in ``CUDA_VISIBLE_DEVICES`` order."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: ask CUDA (no context is created for a count)
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _nvml(physical: list[str]) -> tuple[list[str], str | None]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(int(p)) if p.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(p)
                   for p in physical]
        names = [n.decode() if isinstance(n, bytes) else n for n in map(pynvml.nvmlDeviceGetName, handles)]
        driver = pynvml.nvmlSystemGetDriverVersion()
        return names, driver.decode() if isinstance(driver, bytes) else driver
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> tuple[list[str], str | None]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [line.split(", ") for line in out.strip().splitlines()]
    return [r[0] for r in rows], rows[0][1] if rows else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_machine(device: str, gpus: int, physical: list[str]) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "transformers": transformers.__version__, "gpu_count": gpus}
    if device != "cuda":
        info["device_summary"] = f"CPU only ({info['cpu']}, {info['cpu_cores']} cores), no GPU"
        return info
    names, driver = [], None
    for probe in (lambda: _nvml(physical[:gpus]), _nvidia_smi):
        try:
            names, driver = probe()
            break
        except Exception:  # noqa: BLE001 - try the next source; the trainers report names too
            continue
    info.update(gpu_names=names[:gpus], driver=driver, cuda_visible_devices=physical[:gpus])
    kinds = sorted(set(names[:gpus])) or ["unknown GPU"]
    info["device_summary"] = f"{gpus} x {' + '.join(kinds)}, driver {driver or 'unknown'}"
    return info
