"""Transport selection: a pure function of the two peers' identity records.

The ladder, first rung that both peers can run wins::

    override (--transport / ZMQDISAGG_TRANSPORT)      -> that transport, or TransportUnavailable
    both on GPU, same host, same PID namespace:
        same GPU                                      -> cuda_ipc   (zero-copy possible)
        NVML P2P (NVLink, else PCIe read/write) ok    -> cuda_ipc
    both on GPU (other host, no P2P, or other PID ns) -> nccl
    same host                                         -> shm
    anywhere                                          -> inline

"Same host" means equal hostname AND boot id. Identity records come from ``topology.local_identity``
and travel in the hello message, so this function runs on recorded data in tests. The verdict is then
confirmed by a trial transfer during the handshake; a failed trial excludes the transport and the
client asks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from zmqdisagg.errors import ProtocolMismatch, TransportUnavailable


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    """Who a peer is and where its tensors live, as exchanged in the hello message."""

    hostname: str
    boot_id: str
    pid_ns: str
    pid: int
    device: str = "cpu"  # torch device of this side's tensors
    gpu_uuid: str | None = None  # UUID of ``device`` when it is a GPU
    pci_bus_id: str | None = None  # NVML's PCI bus id of ``device``, for logs and ``python -m zmqdisagg.topology``
    mig: bool = False  # ``device`` is a MIG slice (no CUDA IPC across it)
    p2p: tuple[str, ...] = ()  # UUIDs of other GPUs this GPU reaches peer-to-peer (NVML)
    visible: tuple[str, ...] = ()  # UUIDs of the GPUs this process can open (its CUDA_VISIBLE_DEVICES)
    transports: tuple[str, ...] = ("shm", "inline")  # what this process can run, best first

    def to_wire(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k in self.__slots__
                if (v := getattr(self, k)) is not None or k == "gpu_uuid"}

    @classmethod
    def from_wire(cls, d: Any) -> "Identity":
        try:
            return cls(hostname=str(d["hostname"]), boot_id=str(d["boot_id"]), pid_ns=str(d["pid_ns"]),
                       pid=int(d["pid"]), device=str(d.get("device", "cpu")),
                       gpu_uuid=d.get("gpu_uuid") and str(d["gpu_uuid"]), mig=bool(d.get("mig", False)),
                       pci_bus_id=d.get("pci_bus_id") and str(d["pci_bus_id"]),
                       p2p=tuple(str(u) for u in d.get("p2p", ())),
                       visible=tuple(str(u) for u in d.get("visible", ())),
                       transports=tuple(str(t) for t in d.get("transports", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolMismatch(f"malformed identity record: {e}") from None

    @property
    def on_gpu(self) -> bool:
        return self.gpu_uuid is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    """The selected transport and the reason, for logs and ``stats``."""

    name: str
    reason: str
    zero_copy: bool = False
    considered: tuple[str, ...] = field(default_factory=tuple)


def same_host(a: Identity, b: Identity) -> bool:
    return a.hostname == b.hostname and a.boot_id == b.boot_id


def can_open(peer: Identity, uuid: str | None) -> bool:
    """Whether ``peer`` can open GPU ``uuid`` (an empty ``visible`` means the peer did not say)."""
    return not peer.visible or uuid in peer.visible


def ladder(server: Identity, client: Identity) -> list[tuple[str, str, bool]]:
    """Every rung that applies to this pair, best first, as (transport, reason, zero_copy)."""
    rungs: list[tuple[str, str, bool]] = []
    host = same_host(server, client)
    if server.on_gpu and client.on_gpu:
        if host and server.pid_ns == client.pid_ns and not (server.mig or client.mig):
            if server.gpu_uuid == client.gpu_uuid:
                rungs.append(("cuda_ipc", "same GPU, same host and PID namespace", True))
            elif not can_open(client, server.gpu_uuid):
                pass  # the client cannot open the server's GPU (CUDA_VISIBLE_DEVICES): no IPC mapping
            elif client.gpu_uuid in server.p2p or server.gpu_uuid in client.p2p:
                rungs.append(("cuda_ipc", "same host, GPUs peer-to-peer per NVML", False))
        why = ("other host" if not host else "same host, other PID namespace" if server.pid_ns != client.pid_ns
               else "same host, MIG slice" if server.mig or client.mig
               else "same host, client cannot open the server's GPU" if not can_open(client, server.gpu_uuid)
               else "same host, no P2P between GPUs")
        rungs.append(("nccl", f"both on GPU, {why}", False))
    if host:
        rungs.append(("shm", "same host", False))
    rungs.append(("inline", "reachable over ZeroMQ", False))
    return rungs


def choose(server: Identity, client: Identity, *, override: str | None = None,
           exclude: Iterable[str] = ()) -> Choice:
    """Pick the transport for one connection (see the module docstring for the ladder)."""
    both = [t for t in server.transports if t in client.transports and t not in set(exclude)]
    if override:
        if override not in both:
            raise TransportUnavailable(
                f"transport {override!r} was forced but server offers {list(server.transports)} and "
                f"client offers {list(client.transports)}; unset --transport/ZMQDISAGG_TRANSPORT or "
                "install what it needs")
        return Choice(name=override, reason="forced by --transport or ZMQDISAGG_TRANSPORT",
                      zero_copy=override == "cuda_ipc" and server.gpu_uuid == client.gpu_uuid,
                      considered=tuple(both))
    for name, reason, zero_copy in ladder(server, client):
        if name in both:
            return Choice(name=name, reason=reason, zero_copy=zero_copy, considered=tuple(both))
    raise TransportUnavailable(
        f"no transport both peers can run (server {list(server.transports)}, client "
        f"{list(client.transports)}, excluded {sorted(set(exclude))}); install matching extras")


class TrialVerdicts:
    """Outcomes of handshake trial transfers, per (server GPU, client GPU, transport).

    ``choose`` is a guess from identity records; the trial proves it. A transport whose trial failed
    between two GPUs (or two CPU hosts) is excluded the next time the same pair handshakes, so a client
    that reconnects does not pay for the same failure twice. Successes are recorded too, for ``stats``.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], tuple[bool, str]] = {}

    @staticmethod
    def _key(server: Identity, client: Identity, name: str) -> tuple[str, str, str]:
        where = lambda i: i.gpu_uuid or f"{i.hostname}/{i.boot_id}"  # noqa: E731
        return where(server), where(client), name

    def record(self, server: Identity, client: Identity, name: str, ok: bool, detail: str = "") -> None:
        self._seen[self._key(server, client, name)] = (ok, detail)

    def excluded(self, server: Identity, client: Identity) -> frozenset[str]:
        """Transports whose last trial between this pair failed."""
        s, c, _ = self._key(server, client, "")
        return frozenset(n for (ks, kc, n), (ok, _) in self._seen.items() if ks == s and kc == c and not ok)

    def get(self, server: Identity, client: Identity, name: str) -> tuple[bool, str] | None:
        return self._seen.get(self._key(server, client, name))


verdicts = TrialVerdicts()  # process-wide: a client process keeps what its trials learned
