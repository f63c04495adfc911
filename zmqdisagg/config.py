"""Frozen, keyword-only configuration of the server and the client.

Every field is validated in ``__post_init__``; a bad value raises ``ConfigError`` naming the field and
the flag that sets it. Defaults come from ``zmqdisagg.envs`` where an environment variable exists.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from zmqdisagg import envs
from zmqdisagg.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


def check_address(address: str, field_name: str) -> str:
    """Accept ``tcp://HOST:PORT`` (port may be ``*`` for bind) or ``ipc://PATH``."""
    if address.startswith("ipc://") and len(address) > len("ipc://"):
        return address
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/]+):(\d+|\*)", address)
    if not m:
        raise ConfigError(f"{field_name}={address!r} is not tcp://HOST:PORT or ipc:///path/to/socket")
    return address


def is_loopback(address: str) -> bool:
    """True for ipc:// and for tcp:// on a loopback host."""
    if address.startswith("ipc://"):
        return True
    host = urlsplit(address.replace("tcp://", "http://", 1)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeConfig:
    """Everything ``zmqdisagg-serve`` needs (``--flag`` names in the messages)."""

    model: str  # --model: a local HF directory or a config file in configs/
    bind: str = "tcp://127.0.0.1:5555"  # --bind
    device: str = "cpu"  # --device
    dtype: str = "float32"  # --dtype
    seed: int = 0  # --seed: random init of config-built targets
    transport: str | None = None  # --transport: force one transport for every connection
    lease_s: float = field(default_factory=lambda: envs.ZMQDISAGG_LEASE_S)  # --lease-s
    max_slots: int = field(default_factory=lambda: envs.ZMQDISAGG_MAX_SLOTS)  # --max-slots
    max_tokens: int = 1 << 20  # --max-tokens: most tokens (B*S) in one request
    max_request_bytes: int = 64 << 20  # largest request message accepted
    max_bench_bytes: int = 1 << 30  # --max-bench-bytes: largest payload of the bench op
    transfer_timeout_s: float = field(default_factory=lambda: envs.ZMQDISAGG_TRANSFER_TIMEOUT_S)
    insecure: bool = False  # --insecure: allow a non-loopback bind without authentication
    curve_secret_key: str | None = None  # --curve-secret-key: the server's NAME.key_secret file
    curve_authorized_dir: str | None = None  # --curve-authorized-dir: public keys of admitted clients
    tp: int = 1  # --tp: tensor-parallel ranks serving this target (rank 0 owns the socket)
    tp_timeout_s: float = 60.0  # --tp-timeout-s: deadline of one collective between the ranks
    batch_tokens: int = 0  # --batch-tokens: pack queued requests into forwards of at most this many tokens (0: off)

    def __post_init__(self) -> None:
        check_address(self.bind, "--bind")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"--dtype={self.dtype!r} must be one of {_DTYPES}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device={self.device!r} must be cpu, cuda or cuda:N")
        for name in ("lease_s", "transfer_timeout_s", "tp_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.max_slots < 1 or self.max_tokens < 1:
            raise ConfigError("--max-slots and --max-tokens must be at least 1")
        if self.tp < 1:
            raise ConfigError(f"--tp={self.tp} must be at least 1 (1: no tensor parallelism)")
        if self.batch_tokens < 0:
            raise ConfigError(f"--batch-tokens={self.batch_tokens} must be 0 (off) or a positive token budget")
        if bool(self.curve_secret_key) != bool(self.curve_authorized_dir):
            raise ConfigError("--curve-secret-key and --curve-authorized-dir go together; pass both or neither")
        if not is_loopback(self.bind) and not (self.insecure or self.curve_secret_key):
            raise ConfigError(
                f"--bind={self.bind} is not loopback; pass --curve-secret-key and --curve-authorized-dir "
                "(keys from zmqdisagg-keygen), or --insecure to serve unauthenticated")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """How a ``RemoteTarget`` talks to its servers."""

    device: str = "cpu"  # where delivered tensors must land
    transport: str | None = field(default_factory=lambda: envs.ZMQDISAGG_TRANSPORT)  # force a transport
    attempt_timeout_s: float = field(default_factory=lambda: envs.ZMQDISAGG_ATTEMPT_TIMEOUT_S)
    request_timeout_s: float = field(default_factory=lambda: envs.ZMQDISAGG_REQUEST_TIMEOUT_S)
    connect_timeout_s: float = 30.0  # handshake deadline per server
    transfer_timeout_s: float = field(default_factory=lambda: envs.ZMQDISAGG_TRANSFER_TIMEOUT_S)  # one transfer
    max_lanes: int = 8  # most requests in flight per server
    revive_s: float = field(default_factory=lambda: envs.ZMQDISAGG_REVIVE_S)  # re-probe a dead server (0: never)
    min_servers: int = field(default_factory=lambda: envs.ZMQDISAGG_MIN_SERVERS)  # servers that must answer at start
    curve_server_key: str | None = None  # the server's public NAME.key file (enables CURVE)
    curve_client_key: str | None = None  # this client's NAME.key_secret file

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} must be cpu, cuda or cuda:N")
        if self.attempt_timeout_s <= 0 or self.request_timeout_s < self.attempt_timeout_s:
            raise ConfigError(
                f"attempt_timeout_s={self.attempt_timeout_s} must be positive and at most "
                f"request_timeout_s={self.request_timeout_s}")
        if self.max_lanes < 1:
            raise ConfigError(f"max_lanes={self.max_lanes} must be at least 1")
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"connect_timeout_s={self.connect_timeout_s} must be positive")
        if self.revive_s < 0:
            raise ConfigError(f"revive_s={self.revive_s} must be 0 (never re-admit a dead server) or positive "
                              "(ZMQDISAGG_REVIVE_S)")
        if self.min_servers < 1:
            raise ConfigError(f"min_servers={self.min_servers} must be at least 1 (ZMQDISAGG_MIN_SERVERS)")
        if bool(self.curve_server_key) != bool(self.curve_client_key):
            raise ConfigError("curve_server_key and curve_client_key go together; pass both or neither")

    def curve(self) -> tuple[str, str] | None:
        """(server public key file, client secret key file) when CURVE is on, else None."""
        return (self.curve_server_key, self.curve_client_key) if self.curve_server_key else None
