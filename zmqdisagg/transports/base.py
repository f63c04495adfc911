"""The ``Transport`` protocol: how one reply's tensors move from the server to one client.

A transport object exists per connection and per side. Its lifecycle::

    server                                   client
    ------                                   ------
    t = create(name, ctx(role="server"))
    offer = t.offer()        --- hello reply --->  t = create(name, ctx(role="client"))
                                                   t.accept(offer)        # map segments, join comm
    d = t.put(tensors)       --- data reply --->   out = t.get(d.note, metas, frames)
    d.start() (if any)       ... bytes move ...    (returns tensors the caller owns)
    t.release(slot)          <-- release ids ---   (piggybacked on the next request)
    t.close()                                      t.close()

Only ``Delivery.note`` (JSON metadata: slot id, generation, segment name) and the ``TensorMeta``s go in
the control-plane header. The bytes go through the transport: frames (inline), shared memory (shm),
CUDA IPC slots (cuda_ipc) or a communicator (nccl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.protocol.tensor_meta import TensorMeta

ROLES = ("server", "client")


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportContext:
    """What a transport needs to know about its side of one connection."""

    role: str  # "server" or "client"
    connection_id: str  # the client's id; names per-connection resources (segments, communicators)
    device: str = "cpu"  # where this side's tensors live ("cpu", "cuda:0")
    max_slots: int = 8  # most slots the server may hold for this connection at once
    shm_dir: str = "/dev/shm"  # where shm segments live
    transfer_timeout_s: float = 60.0  # deadline of one transfer (communicator transports)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role={self.role!r} must be one of {ROLES}")
        if self.max_slots < 1:
            raise ConfigError(f"max_slots={self.max_slots} must be at least 1")


@runtime_checkable
class Work(Protocol):
    """An asynchronous transfer in progress (``torch.distributed.Work``-like)."""

    def is_completed(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> None: ...


@dataclass(kw_only=True, slots=True)
class Delivery:
    """What ``put`` staged for one reply.

    ``note`` and ``metas`` go into the reply header; ``frames`` follow it on the socket (inline only);
    ``slot`` is held until the client releases it (None if nothing is held); ``start``, if set, is called
    once the reply header is sent and returns the ``Work`` of a transfer the client will join.
    """

    note: dict[str, Any]
    metas: tuple[TensorMeta, ...]
    frames: list[Any] = field(default_factory=list)
    slot: int | None = None
    start: Callable[[], Work] | None = None


@runtime_checkable
class Transport(Protocol):
    """One side of one connection's data plane.

    ``offer``/``accept`` exist because attaching needs facts only the server has (segment names, a
    communicator id). ``put``/``get`` move one reply. ``release`` exists because the server must not
    overwrite a slot the client is still reading. ``close`` frees everything and is idempotent.
    ``runtime_checkable`` checks only that the methods exist, not their signatures.
    """

    name: str

    def offer(self) -> dict[str, Any]: ...

    def accept(self, offer: Mapping[str, Any]) -> None: ...

    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery: ...

    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def release(self, slot: int) -> None: ...

    def close(self) -> None: ...
