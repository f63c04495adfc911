"""Start ``zmqdisagg-serve`` as a child process on a free loopback port, for demos, tests and benches.

``spawn_server`` waits for the ready line, so the returned ``address`` accepts requests at once, and
stops the process (SIGTERM, then SIGKILL after a grace period) when the context exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from zmqdisagg.errors import PeerTimeout

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServerProcess:
    """A running ``zmqdisagg-serve`` child and the address it announced."""

    proc: subprocess.Popen
    address: str
    transports: tuple[str, ...]
    log: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, grace_s: float = 5.0) -> int:
        """SIGTERM and wait; SIGKILL if it outlives ``grace_s``. Returns the exit code. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("server pid %d ignored SIGTERM for %.1fs; killing it", self.proc.pid, grace_s)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: str, *, bind: str = "tcp://127.0.0.1:*", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, timeout_s: float = 120.0) -> ServerProcess:
    """Launch a server and block until it prints its ready line."""
    cmd = [sys.executable, "-m", "zmqdisagg.cli.serve", "--model", model, "--bind", bind, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    log: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        log.append(line.rstrip())
        if line.startswith("zmqdisagg-serve ready on "):
            address, _, rest = line[len("zmqdisagg-serve ready on "):].strip().partition(" ")
            names = tuple(rest.partition("=")[2].split(","))
            threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
            return ServerProcess(proc=proc, address=address, transports=names, log=log)
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    raise PeerTimeout("zmqdisagg-serve did not become ready; its output:\n" + "\n".join(log[-30:]))


@contextlib.contextmanager
def spawn_server(model: str = "configs/tiny-llama.json", *, bind: str = "tcp://127.0.0.1:*",
                 transport: str | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """``with spawn_server(...) as srv: RemoteTarget([srv.address])``."""
    args = (*extra, *(("--transport", transport) if transport else ()))
    server = start_server(model, bind=bind, extra=args, env=env)
    try:
        yield server
    finally:
        server.stop()


def _drain(proc: subprocess.Popen, log: list[str]) -> None:
    for line in proc.stdout:
        log.append(line.rstrip())
        if len(log) > 2000:
            del log[:1000]
