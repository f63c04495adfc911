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

READY = "zmqdisagg-serve ready on "  # the line cli/serve.py prints once it accepts requests


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
    ready: list[str] = []  # the ready line, once seen
    seen = threading.Event()
    threading.Thread(target=_read, args=(proc, log, ready, seen), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    # Wait on the reader, not on stdout: a child that hangs silently must not block us past the deadline.
    while not seen.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if ready:
        address, _, rest = ready[0][len(READY):].strip().partition(" ")
        return ServerProcess(proc=proc, address=address, transports=tuple(rest.partition("=")[2].split(",")),
                             log=log)
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


def _read(proc: subprocess.Popen, log: list[str], ready: list[str], seen: threading.Event) -> None:
    """Collect the child's output (bounded) and flag its ready line."""
    for line in proc.stdout:
        log.append(line.rstrip())
        if not ready and line.startswith(READY):
            ready.append(line)
            seen.set()
        if len(log) > 2000:
            del log[:1000]
    seen.set()  # the child closed its output: it has exited
