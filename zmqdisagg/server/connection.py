"""Per-client state on the server: transport, settings, lease, and the idempotency cache.

One ``Connection`` exists per client id between its ``hello`` and its ``bye`` (or lease expiry). It
owns the server side of the client's transport, so closing it frees every slot, segment, mapped
handle and communicator that client held.

Idempotency: each lane keeps its last ``(request_id, reply)``. A request whose ``(lane, request_id)``
matches gets that same reply again (same slot, same bytes); a new request id on the lane replaces it.
A retry can therefore never receive another request's tensors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from zmqdisagg.protocol.messages import Header
from zmqdisagg.target.types import TargetSettings
from zmqdisagg.transports.base import Delivery, Work
from zmqdisagg.transports.select import Choice

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class CachedReply:
    """The last reply sent on one lane, kept so a retry gets exactly the same answer."""

    request_id: int
    header: Header
    delivery: Delivery | None


@dataclass(kw_only=True, slots=True)
class PendingWork:
    """A transfer started after its reply was sent (communicator transports)."""

    work: Work
    deadline: float


@dataclass(kw_only=True)
class Connection:
    """Everything the server knows about one client."""

    client_id: str
    transport: Any  # the server side of this client's Transport
    choice: Choice
    lease_s: float
    settings: TargetSettings = field(default_factory=TargetSettings)
    t2d: torch.Tensor | None = None
    lanes: dict[int, CachedReply] = field(default_factory=dict)
    pending: list[PendingWork] = field(default_factory=list)
    requests: int = 0
    bytes_out: int = 0
    expires_at: float = 0.0
    closed: bool = False

    def __post_init__(self) -> None:
        self.touch()

    def touch(self) -> None:
        """Extend the lease: any message from the client proves it is alive."""
        self.expires_at = time.monotonic() + self.lease_s

    def expired(self, now: float) -> bool:
        return now > self.expires_at

    def cached(self, header: Header) -> CachedReply | None:
        entry = self.lanes.get(header.lane)
        return entry if entry is not None and entry.request_id == header.request_id else None

    def remember(self, header: Header, reply: Header, delivery: Delivery | None) -> None:
        self.lanes[header.lane] = CachedReply(request_id=header.request_id, header=reply, delivery=delivery)
        if delivery is not None:
            self.requests += 1
            self.bytes_out += sum(m.nbytes for m in delivery.metas)

    def release(self, slots: tuple[int, ...]) -> None:
        for slot in slots:
            self.transport.release(slot)

    def poll_pending(self, now: float) -> str | None:
        """Drop finished transfers; return an error message if one passed its deadline."""
        still = []
        for p in self.pending:
            if p.work.is_completed():
                error = getattr(p.work, "error", None)  # a failed transfer also counts as completed
                if error is not None:
                    return f"a transfer failed: {error}"
                continue
            if now > p.deadline:
                return "a transfer passed its deadline"
            still.append(p)
        self.pending = still
        return None

    def stats(self) -> dict[str, Any]:
        return {"transport": self.choice.name, "reason": self.choice.reason, "requests": self.requests,
                "bytes_out": self.bytes_out, "lease_left_s": round(self.expires_at - time.monotonic(), 3)}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.lanes.clear()
        self.pending.clear()
        try:
            self.transport.close()
        except Exception:  # closing must never take the server down
            logger.exception("closing transport of client %s failed", self.client_id)
