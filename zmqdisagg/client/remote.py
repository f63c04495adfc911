"""``RemoteTarget``: a target model that runs in ``zmqdisagg-serve`` processes, with the exact
interface of the in-process ``TargetModel``.

Calls are thread-safe and may overlap (a prefetcher keeps several in flight); each call takes its own
REQ lane. Data calls go to the live server with the fewest calls in flight. When a server stops
answering within the request timeout, or its data transfer breaks (a communicator aborted because the
server died mid-transfer), it is marked dead and the same batch is sent to another server, so a batch
is neither lost nor computed into two results the trainer sees. When no server is left,
``NoServerAvailable`` says so.

A dead server is not lost for good: every ``revive_s`` it is probed (``revive.py``, without delaying
any call), and once it answers with the same model it gets a fresh connection, the last ``configure``
is replayed, and it is back in rotation. A start needs only ``min_servers`` of the servers to answer;
the others start dead and are probed the same way.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch
import zmq

from zmqdisagg.client.connection import ServerConnection
from zmqdisagg.client.revive import DOWN, Configured, Reviver, connect_all
from zmqdisagg.config import ClientConfig, check_address
from zmqdisagg.errors import ConfigError, NoServerAvailable
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
        self._addresses = list(dict.fromkeys(check_address(a, "--servers") for a in addresses))
        if self.config.min_servers > len(self._addresses):
            raise ConfigError(f"min_servers={self.config.min_servers} but only {len(self._addresses)} distinct "
                              "--servers given; lower ZMQDISAGG_MIN_SERVERS or add servers")
        self._ctx = zmq.Context()
        self._lock = threading.Lock()  # guards the routing state below
        self._configure_lock = threading.Lock()  # a configure and a re-admission's replay never interleave
        self._configured: Configured | None = None
        self._users: dict[ServerConnection, int] = {}  # calls routed to each connection and not finished
        self._retired: set[ServerConnection] = set()  # replaced while calls still used them; closed after
        self._turn = 0  # rotates the tie-break between equally loaded servers
        self._reviver: Reviver | None = None
        self.closed = False
        try:
            conns, down = connect_all(self._addresses, self.config, self._ctx)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._servers: list[ServerConnection] = [conns[a] for a in self._addresses if a in conns]
        self._dead: dict[str, str] = down
        self._check_start(conns, down)
        self._reviver = Reviver(self.config, self._ctx, self._servers[0].info)
        for address, why in down.items():
            logger.warning("server %s did not answer (%s); starting without it%s", address, why,
                           f", probing it every {self.config.revive_s}s" if self.config.revive_s else "")
            self._reviver.watch(address, delay=0.0)  # it may be starting: admit it as soon as it answers

    def _check_start(self, conns: dict[str, ServerConnection], down: dict[str, str]) -> None:
        """Enough servers answered (``min_servers``), and they all serve the same model; else close and raise."""
        if len(conns) < self.config.min_servers:
            self.close()
            reasons = "; ".join(f"{a}: {why}" for a, why in down.items())
            raise NoServerAvailable(
                f"{len(conns)} of {len(self._addresses)} target servers answered {sorted(conns)}, fewer than "
                f"min_servers={self.config.min_servers} (ZMQDISAGG_MIN_SERVERS). Down: {reasons}. Start "
                "zmqdisagg-serve there or fix --servers")
        infos = {s.info for s in self._servers}
        if len(infos) != 1:
            self.close()
            raise ConfigError(f"servers {list(conns)} serve different models: {infos}; point all "
                              "--servers at the same target")

    # -- the Target interface ----------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._live()[0].info

    def head_weights(self) -> dict[str, torch.Tensor]:
        return self._route(lambda s: s.data(m.WEIGHTS))

    def configure(self, settings: TargetSettings, t2d: torch.Tensor | None = None) -> TargetSettings:
        wire = settings.to_wire()
        with self._configure_lock:
            self._configured = (wire, t2d)  # replayed to every server re-admitted later
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

    def _pick(self, tried: set[ServerConnection]) -> ServerConnection:
        """The live, untried server with the fewest calls in flight; ties rotate between servers."""
        with self._lock:
            candidates = [s for s in self._live() if s not in tried]
            if not candidates:
                raise NoServerAvailable(f"no server left to try; failures: {self._dead}")
            self._turn += 1
            n = len(self._addresses)
            server = min(candidates, key=lambda s: (s.in_flight, (self._addresses.index(s.address) - self._turn) % n))
            self._users[server] = self._users.get(server, 0) + 1
            return server

    def _route(self, call: Any) -> Any:
        if self._dead and self.config.revive_s:
            self._revive()
        tried: set[ServerConnection] = set()
        last: BaseException | None = None
        while True:
            try:
                server = self._pick(tried)
            except NoServerAvailable as e:
                raise e from last
            tried.add(server)
            try:
                return call(server)
            except DOWN as e:  # the connection cannot serve again
                last = e
                self._fail(server, e)
            finally:
                self._done(server)

    def _fail(self, server: ServerConnection, e: BaseException) -> None:
        with self._lock:
            current = server in self._servers and server.address not in self._dead
            if current:
                self._dead[server.address] = str(e)
        if not current:  # already marked dead, or replaced by a re-admitted connection: nothing to do
            return
        if server.transport_name == "shm":
            sweep_stale()  # a killed server on this host cannot unlink its own segments
        logger.warning("server %s failed (%s); sending its work to the remaining servers", server.address, e)
        if self.config.revive_s:
            self._reviver.watch(server.address, delay=self.config.revive_s)

    def _done(self, server: ServerConnection) -> None:
        with self._lock:
            left = self._users.pop(server) - 1
            if left:
                self._users[server] = left
            orphan = not left and server in self._retired
            if orphan:
                self._retired.discard(server)
        if orphan:
            server.close()

    def _revive(self) -> None:
        """Re-admit one dead server whose probe came back with our model (see ``revive.py``)."""
        with self._lock:
            dead = list(self._dead)
        address = self._reviver.answered(dead)
        if address is None:
            return
        fresh, admitted = None, False
        try:
            with self._configure_lock:
                fresh = self._reviver.connect(address, self._configured)
                old = self._swap_in(fresh)
            admitted = True
        except Exception as e:
            if fresh is not None:
                fresh.close()
            logger.warning("server %s answered its probe but could not be re-admitted (%s); probing it again "
                           "in %.1fs", address, e, self.config.revive_s)
            return
        finally:
            self._reviver.release(address, admitted)
        if old is not None:
            old.close()  # a bye (short deadline) frees its slots at once if that server never restarted
        logger.info("server %s re-admitted (transport %s%s)", address, fresh.transport_name,
                    ", configuration replayed" if self._configured else "")

    def _swap_in(self, fresh: ServerConnection) -> ServerConnection | None:
        """Put ``fresh`` in rotation; returns the connection it replaces if no call uses that any more."""
        with self._lock:
            if self.closed:
                raise NoServerAvailable("the RemoteTarget was closed while a server was re-admitted")
            old = next((s for s in self._servers if s.address == fresh.address), None)
            others = [s for s in self._servers if s is not old]
            self._servers = sorted([*others, fresh], key=lambda s: self._addresses.index(s.address))
            self._dead.pop(fresh.address, None)
            if old is not None and old in self._users:
                self._retired.add(old)  # calls still hold it; the last one closes it
                return None
            return old

    # -- the rest ----------------------------------------------------------------------------------
    @property
    def transports(self) -> dict[str, str]:
        """Transport chosen for each connected server, by address."""
        return {s.address: s.transport_name for s in self._servers}

    def stats(self) -> dict[str, Any]:
        return {s.address: s.stats() for s in self._live()}

    def close(self) -> None:
        if self.closed:
            return
        with self._lock:
            self.closed = True
            servers, retired = list(self._servers), list(self._retired)
        if self._reviver is not None:
            self._reviver.close()
        for s in servers:
            s.close(say_bye=s.address not in self._dead)
        for s in retired:
            s.close()
        self._ctx.destroy(linger=0)  # closes any socket still open, so this can never hang

    def __enter__(self) -> "RemoteTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
