"""Processes of ``bench/train_speed.py``: the shared server pool and the trainer process groups.

Servers are ``zmqdisagg-serve`` children (``zmqdisagg.server.spawn.start_server``), one per
``(index, tp)`` key, started in a background thread (so a server loads its target while co-located
layouts train on other GPUs) and kept until a trainer needs their GPUs or the run ends.

Trainer ranks are plain processes with the variables torchrun would set (``RANK``, ``WORLD_SIZE``,
``MASTER_PORT``, ...), each in its own session, so a hung rank and anything it started are killed as a
process group. ``run_group`` watches each job's ``started.json``/``result.json``; a job that passes its
deadline, or whose process dies, is recorded as such, the group is killed and restarted for the jobs
that remain. Nothing here outlives ``close()``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zmqdisagg.server.spawn import ServerProcess, start_server

logger = logging.getLogger("zmqdisagg.bench." + __name__.rpartition(".")[2])

WORKER = Path(__file__).resolve().with_name("_speed_worker.py")
ROOT = WORKER.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_env(gpus: tuple[int, ...], physical: list[str]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for logical GPU ids (mapped through the parent's own list)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(physical[g] for g in gpus)} if gpus else {}


class ServerPool:
    """Servers keyed by ``(index, tp)``; ``launch`` returns at once, ``address`` waits for the ready line."""

    def __init__(self, *, model: str, extra: tuple[str, ...], env: dict[str, str], gpus_of: Callable,
                 physical: list[str], log_dir: Path, timeout_s: float) -> None:
        self._model, self._extra, self._env, self._gpus_of = model, extra, env, gpus_of
        self._physical, self._log_dir, self._timeout_s = physical, log_dir, timeout_s
        self._pool = ThreadPoolExecutor(8, "bench-server-start")
        self._servers: dict[tuple[int, int], Future] = {}

    def gpus(self, key: tuple[int, int]) -> tuple[int, ...]:
        return self._gpus_of(key)

    def launch(self, key: tuple[int, int]) -> None:
        if key in self._servers:
            return
        tp = ("--tp", str(key[1])) if key[1] > 1 else ()
        env = {**self._env, **gpu_env(self.gpus(key), self._physical)}
        logger.info("starting server %s on GPUs %s", key, self.gpus(key) or "cpu")
        self._servers[key] = self._pool.submit(start_server, self._model, extra=(*self._extra, *tp), env=env,
                                               timeout_s=self._timeout_s)

    def address(self, key: tuple[int, int]) -> str:
        self.launch(key)
        return self._servers[key].result().address

    def stop_on(self, gpus: set[int]) -> None:
        """Stop every server that occupies one of ``gpus``."""
        for key in [k for k in self._servers if gpus & set(self.gpus(k))]:
            self._stop(key)

    def _stop(self, key: tuple[int, int]) -> None:
        future = self._servers.pop(key)
        try:
            server: ServerProcess = future.result()
        except Exception:  # noqa: BLE001 - it never started; start_server already killed it
            return
        server.stop()
        (self._log_dir / f"server-{key[0]}-tp{key[1]}.log").write_text("\n".join(server.log) + "\n")

    def close(self) -> None:
        for key in list(self._servers):
            self._stop(key)
        self._pool.shutdown(wait=True)


@dataclass(kw_only=True)
class Group:
    """Jobs that run back to back in one set of trainer ranks."""

    world: int
    trainer_gpus: tuple[int, ...]
    visible: tuple[int, ...]  # trainer GPUs first, then the servers' (for CUDA IPC)
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _launch(group: Group, jobs: list[dict[str, Any]], *, env: dict[str, str], physical: list[str],
            log_dir: Path, attempt: int) -> list[subprocess.Popen]:
    path = log_dir / f"jobs-{jobs[0]['name']}.json"
    path.write_text(json.dumps(jobs, indent=1))
    base = {**os.environ, **env, **gpu_env(group.visible, physical)}
    port = str(free_port())
    procs = []
    for rank in range(group.world):
        dist_env = ({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(group.world),
                     "LOCAL_WORLD_SIZE": str(group.world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                    if group.world > 1 else {})
        log = (log_dir / f"trainer-{jobs[0]['name']}-a{attempt}-r{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(path)], cwd=ROOT, env={**base, **dist_env},
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def kill(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM each rank's process group, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is not None:
                continue  # exited: its group id may already belong to someone else
            try:
                os.killpg(p.pid, sig)  # the rank leads its own session (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    for p in procs:
        p.wait()


def run_group(group: Group, *, env: dict[str, str], physical: list[str], log_dir: Path, job_timeout_s: float,
              end_at: float, on_done: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Run the group's jobs; call ``on_done(job, result)`` for each (result ``status``: ok, failed,
    timeout, skipped), restarting the ranks after a failure or a timeout."""
    pending, attempt = list(group.jobs), 0
    while pending:
        if time.time() >= end_at:
            for job in pending:
                on_done(job, {"status": "skipped", "error": "the run's --time-budget was used up"})
            return
        procs = _launch(group, pending, env=env, physical=physical, log_dir=log_dir, attempt=attempt)
        attempt += 1
        try:
            pending = _watch(procs, pending, job_timeout_s, end_at, on_done)
        finally:
            kill(procs)


def _watch(procs: list[subprocess.Popen], pending: list[dict[str, Any]], job_timeout_s: float, end_at: float,
           on_done: Callable) -> list[dict[str, Any]]:
    """Follow the jobs until the ranks exit or one job fails or times out; return the jobs not run."""
    deadline = time.time() + job_timeout_s
    while pending:
        job, out = pending[0], Path(pending[0]["dir"])
        if (out / "result.json").exists():
            result = json.loads((out / "result.json").read_text())
            on_done(job, {**result, "status": "ok" if result.get("ok") else "failed"})
            if not result.get("ok"):
                return pending[1:]  # the worker exits after a failed job
            pending, deadline = pending[1:], time.time() + job_timeout_s
            continue
        if (out / "started.json").exists():
            deadline = min(deadline, json.loads((out / "started.json").read_text())["at"] + job_timeout_s)
        dead = [p.returncode for p in procs if p.poll() is not None and p.returncode != 0]
        if dead or all(p.poll() is not None for p in procs):
            time.sleep(0.5)  # rank 0 may be writing the result of the job that failed
            if (out / "result.json").exists():
                continue
            on_done(job, {"status": "failed", "error": f"trainer exited with codes {dead} (see its log)"})
            return pending[1:]
        if time.time() > min(deadline, end_at):
            why = "job timeout" if time.time() > deadline else "--time-budget used up"
            on_done(job, {"status": "timeout", "error": f"killed: {why}"})
            return pending[1:]
        time.sleep(0.2)
    return []
