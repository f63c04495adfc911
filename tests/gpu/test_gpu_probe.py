"""NVML identity: UUIDs under any CUDA_VISIBLE_DEVICES, P2P by NVLink status, the link's nominal peak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zmqdisagg import gpu_probe
from zmqdisagg.topology import matrix

pytestmark = pytest.mark.gpu


def _uuid_in_child(visible: str) -> str:
    code = "from zmqdisagg import gpu_probe; print(gpu_probe.describe('cuda:0')['gpu_uuid'])"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


def test_describe_names_the_gpu_by_uuid():
    d = gpu_probe.describe("cuda:0")
    assert d["gpu_uuid"].startswith(("GPU-", "MIG-")) and d["mig"] in (True, False)
    assert len(d["visible"]) == torch.cuda.device_count()
    assert gpu_probe.local_index(d["gpu_uuid"]) == 0
    assert gpu_probe.machine_name().split("x ")[0].isdigit()


@pytest.mark.multi_gpu(2)
def test_uuid_mapping_survives_cuda_visible_devices():
    u1 = gpu_probe.cuda_uuid(1)
    assert _uuid_in_child("1") == u1
    assert _uuid_in_child(u1) == u1  # CUDA_VISIBLE_DEVICES given as a UUID


@pytest.mark.multi_gpu(2)
def test_p2p_and_peak_between_the_two_gpus():
    u0, u1 = gpu_probe.cuda_uuid(0), gpu_probe.cuda_uuid(1)
    assert u1 in gpu_probe.describe("cuda:0")["p2p"]
    peak, how = gpu_probe.link_peak_gbps(u0, u1)
    print(f"nominal peak {peak} GB/s ({how})")
    assert peak and peak > 20, how
    rows = {(r["server"], r["client"]): r for r in matrix()}
    assert rows[("cuda:0", "cuda:1")]["transport"] == "cuda_ipc"
    assert rows[("cuda:0", "cuda:0")]["zero_copy"]
