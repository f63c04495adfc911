"""GPU facts for transport selection, from NVML (``pynvml``) and the CUDA runtime (through torch).

What it guarantees:

* A GPU is named by its UUID (``GPU-…``, or ``MIG-…`` for a MIG slice), never by an index. The torch
  ordinal is mapped to NVML by the UUID that CUDA itself reports, so ``CUDA_VISIBLE_DEVICES`` given as
  indices, UUIDs or MIG ids, and any ``CUDA_DEVICE_ORDER``, all resolve to the same physical GPU. When
  the UUID lookup fails (old drivers), the PCI bus id is tried.
* Peer reachability comes from ``nvmlDeviceGetP2PStatus``: NVLink first, then PCIe read *and* write.
  The PCIe common ancestor is never consulted: on the VMs we run on it says HOSTBRIDGE while 18 NVLinks
  are up (``shared/reference/gpu-baselines.md``).
* Nothing here raises for a missing driver or NVML: ``describe`` returns what CUDA alone can tell, and
  the caller (``topology.local_identity``) decides.

``link_peak_gbps`` gives the nominal one-direction peak between two GPUs (active NVLink count × per-link
speed), which the benchmark divides by.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

logger = logging.getLogger(__name__)

# nvml.h enums. pynvml 13 spells NVML_P2P_CAPS_INDEX_READ as a 1-tuple, so the values are written here.
P2P_READ, P2P_WRITE, P2P_NVLINK = 0, 1, 2
P2P_OK = 0
FI_NVLINK_SPEED_MBPS_COMMON = 90  # NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON: per-link, per-direction MB/s
# Per-link, per-direction GB/s by NVLink version, used when the field query is unsupported.
NVLINK_GBPS = {1: 20.0, 2: 25.0, 3: 25.0, 4: 26.5625, 5: 50.0}
PCIE_GBPS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # one direction, after encoding

_lock = threading.Lock()


@contextlib.contextmanager
def nvml() -> Iterator[Any]:
    """``pynvml`` initialised for the block (NVML counts inits, so nesting is fine)."""
    import pynvml

    with _lock:
        pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        with _lock:
            pynvml.nvmlShutdown()


def cuda_uuid(index: int) -> str:
    """The UUID CUDA reports for torch ordinal ``index``, with NVML's ``GPU-`` prefix."""
    import torch

    u = str(torch.cuda.get_device_properties(index).uuid)
    return u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}"


def pci_bus_id(index: int) -> str | None:
    """``DDDDDDDD:BB:DD.0`` of torch ordinal ``index`` as NVML spells it, or None if torch lacks it."""
    import torch

    p = torch.cuda.get_device_properties(index)
    try:
        return f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
    except AttributeError:
        return None


def local_index(uuid: str) -> int | None:
    """The torch ordinal of the GPU with ``uuid`` in this process, or None if it is not visible."""
    import torch

    for i in range(torch.cuda.device_count()):
        if _same_uuid(cuda_uuid(i), uuid):
            return i
    return None


def visible_uuids() -> tuple[str, ...]:
    """UUIDs of every GPU this process can open, in torch ordinal order."""
    import torch

    return tuple(cuda_uuid(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


def _same_uuid(a: str, b: str) -> bool:
    strip = lambda u: u.split("-", 1)[1] if u.startswith(("GPU-", "MIG-")) else u  # noqa: E731
    return strip(a).lower() == strip(b).lower()


def _handle(nv: Any, uuid: str, bus_id: str | None) -> Any:
    """NVML handle for a CUDA UUID; MIG slices and old drivers need the fallbacks."""
    candidates = [uuid, "MIG-" + uuid.split("-", 1)[1]] if uuid.startswith("GPU-") else [uuid]
    for u in candidates:
        try:
            return nv.nvmlDeviceGetHandleByUUID(u)
        except nv.NVMLError:
            continue
    if bus_id is not None:
        return nv.nvmlDeviceGetHandleByPciBusId(bus_id)
    raise LookupError(f"NVML does not know GPU {uuid}")


def _is_mig(nv: Any, h: Any) -> bool:
    try:
        if nv.nvmlDeviceIsMigDeviceHandle(h):
            return True
    except nv.NVMLError:
        pass
    try:
        return nv.nvmlDeviceGetMigMode(h)[0] == nv.NVML_DEVICE_MIG_ENABLE
    except nv.NVMLError:  # MIG not supported on this part
        return False


def p2p_kind(nv: Any, a: Any, b: Any) -> str | None:
    """"nvlink", "pcie" or None for two NVML handles (P2P status only, never the PCIe ancestor)."""
    def ok(cap: int) -> bool:
        try:
            return nv.nvmlDeviceGetP2PStatus(a, b, cap) == P2P_OK
        except nv.NVMLError:
            return False

    if ok(P2P_NVLINK):
        return "nvlink"
    if ok(P2P_READ) and ok(P2P_WRITE):
        return "pcie"
    return None


def describe(device: str) -> dict[str, Any]:
    """Identity fields of ``device`` ("cuda:N"): gpu_uuid, pci_bus_id, mig, p2p, visible."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    uuid, bus = cuda_uuid(index), pci_bus_id(index)
    out: dict[str, Any] = {"gpu_uuid": uuid, "pci_bus_id": bus, "mig": False, "p2p": (),
                           "visible": visible_uuids()}
    try:
        with nvml() as nv:
            me = _handle(nv, uuid, bus)
            out["mig"] = _is_mig(nv, me)
            if out["mig"]:
                return out  # a MIG slice has no CUDA IPC and no NVLink
            peers = []
            for i in range(nv.nvmlDeviceGetCount()):
                other = nv.nvmlDeviceGetHandleByIndex(i)
                other_uuid = nv.nvmlDeviceGetUUID(other)
                other_uuid = other_uuid.decode() if isinstance(other_uuid, bytes) else other_uuid
                if not _same_uuid(other_uuid, uuid) and p2p_kind(nv, me, other):
                    peers.append(other_uuid)
            out["p2p"] = tuple(peers)
    except Exception as e:  # no NVML: keep what CUDA told us; the ladder then prefers nccl across GPUs
        logger.warning("NVML unavailable for %s (%s); P2P between GPUs is assumed absent", uuid, e)
    return out


def link_peak_gbps(uuid_a: str, uuid_b: str) -> tuple[float | None, str]:
    """Nominal one-direction GB/s between two GPUs and how it was derived.

    NVLink: active links × per-link speed (``NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON``, else by NVLink
    version). PCIe P2P: the narrower of the two current link widths × per-lane speed. Same GPU: None.
    """
    if _same_uuid(uuid_a, uuid_b):
        return None, "same GPU"
    try:
        with nvml() as nv:
            a, b = _handle(nv, uuid_a, None), _handle(nv, uuid_b, None)
            kind = p2p_kind(nv, a, b)
            if kind == "nvlink":
                links = _active_nvlinks(nv, a)
                per = _nvlink_speed(nv, a)
                return links * per, f"{links} NVLinks x {per:.3f} GB/s"
            if kind == "pcie":
                gen = min(nv.nvmlDeviceGetCurrPcieLinkGeneration(h) for h in (a, b))
                width = min(nv.nvmlDeviceGetCurrPcieLinkWidth(h) for h in (a, b))
                return width * PCIE_GBPS_PER_LANE.get(gen, 0.0), f"PCIe gen{gen} x{width}"
            return None, "no P2P"
    except Exception as e:
        return None, f"NVML unavailable ({e})"


def _active_nvlinks(nv: Any, h: Any) -> int:
    n = 0
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            n += nv.nvmlDeviceGetNvLinkState(h, link) == nv.NVML_FEATURE_ENABLED
        except nv.NVMLError:
            continue
    return n


def _nvlink_speed(nv: Any, h: Any) -> float:
    """Per-link, per-direction GB/s."""
    try:
        (fv,) = nv.nvmlDeviceGetFieldValues(h, [FI_NVLINK_SPEED_MBPS_COMMON])
        if fv.nvmlReturn == 0 and fv.value.uiVal:
            return fv.value.uiVal / 1000.0
    except Exception:
        pass
    try:
        return NVLINK_GBPS.get(nv.nvmlDeviceGetNvLinkVersion(h, 0), 25.0)
    except nv.NVMLError:
        return 25.0


def machine_name() -> str:
    """``2x NVIDIA H100 80GB HBM3, driver 580.x`` — for benchmark reports."""
    try:
        with nvml() as nv:
            n = nv.nvmlDeviceGetCount()
            name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(0))
            driver = nv.nvmlSystemGetDriverVersion()
            dec = lambda s: s.decode() if isinstance(s, bytes) else s  # noqa: E731
            return f"{n}x {dec(name)}, driver {dec(driver)}"
    except Exception as e:
        return f"no NVIDIA GPU ({type(e).__name__})"
