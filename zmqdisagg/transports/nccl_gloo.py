"""The gloo side of the ``nccl`` transport: what carries a reply when both sides' tensors are on the CPU.

``GlooLink`` is a private ``ProcessGroupGloo`` of two ranks (server 0, client 1) over a ``TCPStore``
that the server side owns on a free port; no default process group is created. It has the same
``rendezvous``/``join``/``send``/``recv``/``abort``/``close`` surface as ``native.nccl_comm.NcclPair``,
so ``nccl.NcclTransport`` drives either. Gloo sends one tensor per message, so ``pack_cpu`` packs a
reply into one buffer (the client returns views of the received buffer).
"""

from __future__ import annotations

import datetime
import logging
import secrets
import socket
from typing import Any, Callable, Mapping, Sequence

import torch

from zmqdisagg.errors import TransportUnavailable
from zmqdisagg.native.nccl_comm import CLIENT_RANK, SERVER_RANK
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes
from zmqdisagg.transports.base import TransportContext

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # joining waits for the client's handshake, so it gets more than one transfer


def pack_cpu(tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta]) -> torch.Tensor:
    total = max((m.offset + m.nbytes for m in metas), default=0)
    buf = torch.empty(total, dtype=torch.uint8)
    for t, m in zip(tensors, metas):
        buf[m.offset:m.offset + m.nbytes].copy_(as_bytes(t.cpu()))
    return buf


class GlooLink:
    """A private ``ProcessGroupGloo`` of two ranks over a ``TCPStore`` that the server side owns."""

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.timeout = datetime.timedelta(seconds=ctx.transfer_timeout_s)  # per send/receive
        self.join_timeout = datetime.timedelta(seconds=max(JOIN_TIMEOUT_S, ctx.transfer_timeout_s))
        self.store: Any = None
        self.pg: Any = None
        self._aborted = False

    def rendezvous(self) -> dict[str, Any]:
        from torch.distributed import TCPStore

        self.store = TCPStore("0.0.0.0", 0, None, True, timeout=self.join_timeout, wait_for_workers=False)
        addr = _host_address()
        hosts = [addr] + (["127.0.0.1"] if addr != "127.0.0.1" else [])
        return {"hosts": hosts, "port": int(self.store.port), "prefix": f"zmqdisagg/{secrets.token_hex(8)}/"}

    def join(self, rank: int, offer: Mapping[str, Any]) -> None:
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        if rank == SERVER_RANK:
            local = _host_address()
        else:
            host, local = _reachable(offer["hosts"], int(offer["port"]), self.ctx.transfer_timeout_s)
            self.store = TCPStore(host, int(offer["port"]), None, False, timeout=self.join_timeout)
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=local)]
        opts._timeout = self.join_timeout
        pg = ProcessGroupGloo(PrefixStore(str(offer["prefix"]), self.store), rank, 2, opts)
        if self._aborted:
            raise TransportUnavailable("connection closed while joining")
        self.pg = pg

    # Gloo point-to-point work completes only inside ``wait()``, so these run on the worker thread and
    # return once the bytes have moved (or gloo's own timeout, the transfer deadline, has passed).
    def send(self, tensors: Sequence[torch.Tensor], tag: int) -> Callable[[], bool]:
        self.pg.send(list(tensors), CLIENT_RANK, tag).wait(self.timeout)
        return _true

    def recv(self, tensors: Sequence[torch.Tensor], tag: int) -> Callable[[], bool]:
        self.pg.recv(list(tensors), SERVER_RANK, tag).wait(self.timeout)
        return _true

    def abort(self) -> None:
        self._aborted = True
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception as e:  # older torch: dropping the group closes its sockets
                logger.debug("gloo abort: %s", e)

    def close(self, abort: bool) -> None:
        if abort:
            self.abort()
        self.pg = None
        self.store = None


def _true() -> bool:
    return True


def _host_address() -> str:
    """This host's address as peers see it (hostname lookup), else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _reachable(hosts: Sequence[str], port: int, timeout: float) -> tuple[str, str]:
    """First of ``hosts`` that accepts a TCP connection on ``port``, and our address toward it."""
    errors = []
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=min(timeout, 5.0)) as s:
                return host, s.getsockname()[0]
        except OSError as e:
            errors.append(f"{host}:{port} ({e})")
    raise TransportUnavailable(f"cannot reach the server's gloo rendezvous at {', '.join(errors)}")


__all__ = ["GlooLink", "JOIN_TIMEOUT_S", "pack_cpu"]
