"""Transport registry: names map to ``module:Class`` and import only when chosen.

``import zmqdisagg`` never imports cupy, NCCL or CUDA code: a GPU transport's module is imported the
first time a connection selects it. ``available()`` lists the transports whose module imports and whose
``probe()`` (if any) says this process can run it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from zmqdisagg.errors import ConfigError, TransportUnavailable
from zmqdisagg.transports.base import Delivery, Transport, TransportContext, Work

logger = logging.getLogger(__name__)

# Best first: the selection ladder walks this order.
_REGISTRY: dict[str, str] = {
    "cuda_ipc": "zmqdisagg.transports.cuda_ipc:CudaIpcTransport",
    "nccl": "zmqdisagg.transports.nccl:NcclTransport",
    "shm": "zmqdisagg.transports.shm:ShmTransport",
    "inline": "zmqdisagg.transports.inline:InlineTransport",
}


def names() -> tuple[str, ...]:
    """Every registered transport name, best first."""
    return tuple(_REGISTRY)


def register(name: str, target: str) -> None:
    """Add a transport as ``"package.module:Class"``; duplicate names raise."""
    if name in _REGISTRY:
        raise ConfigError(f"transport {name!r} is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = target


def transport_class(name: str) -> type:
    """Import and return the class registered under ``name``."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown transport {name!r}; choose one of {', '.join(_REGISTRY)}") from None
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise TransportUnavailable(f"transport {name!r} cannot load here ({e}); install its extra or pick another") from e


def available() -> tuple[str, ...]:
    """Transports this process can run, best first (a class may define ``probe() -> str | None``)."""
    out = []
    for name in _REGISTRY:
        try:
            cls = transport_class(name)
        except (TransportUnavailable, ConfigError) as e:
            logger.debug("transport %s unavailable: %s", name, e)
            continue
        why_not = cls.probe() if hasattr(cls, "probe") else None
        if why_not is None:
            out.append(name)
        else:
            logger.debug("transport %s unavailable: %s", name, why_not)
    return tuple(out)


def create(name: str, ctx: TransportContext) -> Any:
    """Build transport ``name`` for one side of one connection."""
    return transport_class(name)(ctx)


__all__ = ["Delivery", "Transport", "TransportContext", "Work", "available", "create", "names",
           "register", "transport_class"]
