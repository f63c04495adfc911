"""Identity probe: who this process is, for transport selection.

``local_identity`` reads the hostname, the kernel boot id, the PID namespace and, when the tensors
live on a GPU, that GPU's UUID. GPU facts (UUID, MIG, NVML P2P) come from ``zmqdisagg.gpu_probe``
when CUDA and NVML are present; without them the record says "cpu" and the ladder skips GPU rungs.
"""

from __future__ import annotations

import logging
import os
import socket

from zmqdisagg.transports.select import Identity

logger = logging.getLogger(__name__)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown-pidns"


def local_identity(device: str = "cpu", transports: tuple[str, ...] = ("shm", "inline")) -> Identity:
    """This process's identity record for tensors on ``device``."""
    gpu: dict = {}
    if device.startswith("cuda"):
        try:
            from zmqdisagg import gpu_probe
            gpu = gpu_probe.describe(device)
        except Exception as e:  # a probe failure must never stop a connection; GPU rungs are skipped
            logger.warning("GPU probe failed for %s (%s); GPU transports will not be chosen", device, e)
    return Identity(hostname=socket.gethostname(), boot_id=boot_id(), pid_ns=pid_namespace(),
                    pid=os.getpid(), device=device, transports=transports, **gpu)


def matrix(transports: tuple[str, ...] | None = None) -> list[dict]:
    """What ``choose`` would pick between every pair of local devices (CPU and each GPU), and why."""
    from zmqdisagg.transports import available
    from zmqdisagg.transports.select import choose

    transports = available() if transports is None else transports
    devices = ["cpu"]
    try:
        import torch

        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    ids = {d: local_identity(d, transports) for d in devices}
    rows = []
    for s, si in ids.items():
        for c, ci in ids.items():
            ch = choose(si, ci)
            rows.append({"server": s, "client": c, "transport": ch.name, "zero_copy": ch.zero_copy,
                         "reason": ch.reason, "server_gpu": si.gpu_uuid, "client_gpu": ci.gpu_uuid})
    return rows


def main() -> None:
    """``python -m zmqdisagg.topology``: print the selection matrix for this machine."""
    from zmqdisagg.transports import available

    avail = available()
    print(f"host {socket.gethostname()}  boot {boot_id()}  pid-ns {pid_namespace()}")
    print(f"transports this process can run: {', '.join(avail)}")
    rows = matrix(avail)
    for d in sorted({r['server'] for r in rows}):
        if d != "cpu":
            ident = local_identity(d, avail)
            print(f"{d}: {ident.gpu_uuid} bus {ident.pci_bus_id} mig={ident.mig} p2p={list(ident.p2p)}")
    w = max(len(r["server"]) for r in rows)
    print(f"\n{'server':<{w}}  {'client':<{w}}  {'transport':<9}  reason")
    for r in rows:
        zc = " (zero-copy)" if r["zero_copy"] else ""
        print(f"{r['server']:<{w}}  {r['client']:<{w}}  {r['transport']:<9}  {r['reason']}{zc}")


if __name__ == "__main__":
    main()
