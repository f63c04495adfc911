"""Every ``ZMQDISAGG_*`` environment variable, in one place.

Each variable is read when accessed (``envs.ZMQDISAGG_TRANSPORT``), never cached, so tests can set them
with ``monkeypatch.setenv``. CLI flags win over environment variables, which win over defaults.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def _str(name: str, default: str | None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name, default) or default


def _float(name: str, default: float) -> Callable[[], float]:
    return lambda: float(os.environ.get(name) or default)


def _int(name: str, default: int) -> Callable[[], int]:
    return lambda: int(os.environ.get(name) or default)


_VARS: dict[str, Callable[[], Any]] = {
    # Force one data-plane transport (inline, shm, cuda_ipc, nccl) instead of the probe ladder.
    "ZMQDISAGG_TRANSPORT": _str("ZMQDISAGG_TRANSPORT", None),
    # Seconds a client waits for one reply before it drops the lane's socket and retries.
    "ZMQDISAGG_ATTEMPT_TIMEOUT_S": _float("ZMQDISAGG_ATTEMPT_TIMEOUT_S", 60.0),
    # Seconds a client keeps retrying one request before raising PeerTimeout.
    "ZMQDISAGG_REQUEST_TIMEOUT_S": _float("ZMQDISAGG_REQUEST_TIMEOUT_S", 180.0),
    # Seconds between probes of a server a client marked dead, to re-admit it once it answers (0: never).
    "ZMQDISAGG_REVIVE_S": _float("ZMQDISAGG_REVIVE_S", 30.0),
    # Fewest --servers that must answer when a RemoteTarget starts; the rest start dead and are probed.
    "ZMQDISAGG_MIN_SERVERS": _int("ZMQDISAGG_MIN_SERVERS", 1),
    # Seconds without any message after which the server reclaims a client's slots and state.
    "ZMQDISAGG_LEASE_S": _float("ZMQDISAGG_LEASE_S", 60.0),
    # Directory for POSIX shared-memory segments of the shm transport.
    "ZMQDISAGG_SHM_DIR": _str("ZMQDISAGG_SHM_DIR", "/dev/shm"),
    # Most buffer slots one connection may hold on the server at once.
    "ZMQDISAGG_MAX_SLOTS": _int("ZMQDISAGG_MAX_SLOTS", 8),
    # Seconds an NCCL/gloo transfer may take before the watchdog aborts the communicator.
    "ZMQDISAGG_TRANSFER_TIMEOUT_S": _float("ZMQDISAGG_TRANSFER_TIMEOUT_S", 60.0),
    # cuda_ipc client: "1" server pushes into our receive slots, "0" server packs into its own, "auto" push across GPUs.
    "ZMQDISAGG_CUDA_IPC_PUSH": _str("ZMQDISAGG_CUDA_IPC_PUSH", "auto"),
    # Build-time only (setup.py): 0 skips the CUDA extension in csrc/ even where nvcc exists.
    "ZMQDISAGG_BUILD_NATIVE": _str("ZMQDISAGG_BUILD_NATIVE", "1"),
    # Log level used by the CLIs (DEBUG, INFO, WARNING).
    "ZMQDISAGG_LOG_LEVEL": _str("ZMQDISAGG_LOG_LEVEL", "INFO"),
}


def __getattr__(name: str) -> Any:
    if name in _VARS:
        return _VARS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_VARS)
