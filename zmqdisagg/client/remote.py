"""``RemoteTarget``: a target model that runs in ``zmqdisagg-serve`` processes, with the exact
interface of the in-process ``TargetModel``.

Calls are thread-safe and may overlap (a prefetcher keeps several in flight); each call takes its own
REQ lane. Data calls go to the live server with the fewest calls in flight. When a server stops
answering within the request timeout, or its data transfer breaks (a communicator aborted because the
server died mid-transfer), it is marked dead and the same batch is sent to another server, so a batch
is neither lost nor computed into two results the trainer sees. When no server is left,
``NoServerAvailable`` says so.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch
import zmq

from zmqdisagg.client.connection import ServerConnection
from zmqdisagg.config import ClientConfig, check_address
from zmqdisagg.errors import ConfigError, NoServerAvailable, PeerTimeout, TransportUnavailable
from zmqdisagg.protocol import messages as m
from zmqdisagg.target.types import ModelInfo, TargetBatch, TargetSettings
from zmqdisagg.transports.shm import sweep_stale

logger = logging.getLogger(__name__)


class RemoteTarget:
    """A ``Target`` served by one or more ``zmqdisagg-serve`` processes."""

    def __init__(self, addresses: Sequence[str] | str, config: ClientConfig | None = None) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        if not addresses:
            raise ConfigError("RemoteTarget needs at least one server address (--servers tcp://HOST:PORT)")
        self.config = config or ClientConfig()
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._servers: list[ServerConnection] = []
        self._dead: dict[str, str] = {}
        self._turn = 0  # rotates the tie-break between equally loaded servers
        self.closed = False
        try:
            for address in addresses:
                self._servers.append(ServerConnection(check_address(address, "--servers"), self.config, self._ctx))
        except BaseException:
            self.close()
            raise
        infos = {s.info for s in self._servers}
        if len(infos) != 1:
            self.close()
            raise ConfigError(f"servers {list(addresses)} serve different models: {infos}; point all "
                              "--servers at the same target")

    # -- the Target interface ----------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._live()[0].info

    def head_weights(self) -> dict[str, torch.Tensor]:
        return self._route(lambda s: s.data(m.WEIGHTS))

    def configure(self, settings: TargetSettings, t2d: torch.Tensor | None = None) -> TargetSettings:
        wire = settings.to_wire()
        effective = [s.configure(wire, t2d) for s in self._live()]
        return TargetSettings.from_wire(effective[0])

    def eagle3(self, batch: TargetBatch) -> dict[str, torch.Tensor]:
        return self._route(lambda s: s.data(m.EAGLE3, batch.tensors()))

    def dflash(self, batch: TargetBatch) -> dict[str, torch.Tensor]:
        return self._route(lambda s: s.data(m.DFLASH, batch.tensors()))

    # -- routing and failover ----------------------------------------------------------------------
    def _live(self) -> list[ServerConnection]:
        live = [s for s in self._servers if s.address not in self._dead]
        if not live:
            raise NoServerAvailable(
                f"every target server has failed ({self._dead}); restart zmqdisagg-serve and resume "
                "training from the last checkpoint")
        return live

    def _pick(self, tried: set[str]) -> ServerConnection:
        """The live, untried server with the fewest calls in flight; ties rotate between servers."""
        with self._lock:
            candidates = [s for s in self._live() if s.address not in tried]
            if not candidates:
                raise NoServerAvailable(f"no server left to try; failures: {self._dead}")
            self._turn += 1
            n = len(self._servers)
            return min(candidates, key=lambda s: (s.in_flight, (self._servers.index(s) - self._turn) % n))

    def _route(self, call: Any) -> Any:
        tried: set[str] = set()
        last: BaseException | None = None
        while True:
            try:
                server = self._pick(tried)
            except NoServerAvailable as e:
                raise e from last
            tried.add(server.address)
            try:
                return call(server)
            except (PeerTimeout, TransportUnavailable, zmq.ZMQError) as e:  # the connection cannot serve again
                last = e
                with self._lock:
                    self._dead[server.address] = str(e)
                if server.transport_name == "shm":
                    sweep_stale()  # a killed server on this host cannot unlink its own segments
                logger.warning("server %s failed (%s); sending its work to the remaining servers",
                               server.address, e)

    # -- the rest ----------------------------------------------------------------------------------
    @property
    def transports(self) -> dict[str, str]:
        """Transport chosen for each server, by address."""
        return {s.address: s.transport_name for s in self._servers}

    def stats(self) -> dict[str, Any]:
        return {s.address: s.stats() for s in self._live()}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self._servers:
            s.close(say_bye=s.address not in self._dead)
        self._ctx.destroy(linger=0)  # closes any socket still open, so this can never hang

    def __enter__(self) -> "RemoteTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
