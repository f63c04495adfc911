"""Tensor parallelism behind one server socket: rank 0 serves, every other rank follows.

Rank 0 owns the ROUTER socket and every transport. For each forward it broadcasts one command to
the other ranks over a gloo control group, from the server loop's single thread, then runs its own
shard; all ranks therefore issue the model's collectives in the same order, and no two threads ever
issue collectives in one process. Rank 0 ships the results. A command on the wire::

    int64[2]        kind (PING | COMPUTE | SHUTDOWN), JSON length n
    uint8[n]        JSON {"body": {op, settings}, "tensors": [TensorMeta...]}   (absent when n = 0)
    one tensor      per TensorMeta, in order (input_ids, attention_mask)

Followers compute with ``teacher="hidden"`` and no draft-vocab mask: logits and the softmax are
computed on rank 0 only, from the replicated ``lm_head``, so ``t2d`` never needs to travel.

Failure rules, so that no rank ever hangs:
- Validation (layer ids, token ids, shapes) happens on rank 0 *before* a command is broadcast, so a
  bad request is refused without touching the group.
- Once a command is broadcast, any failure on any rank is fatal: the ranks are out of step. Rank 0
  raises :class:`RankFailed`, which the server loop does not catch; followers exit non-zero.
- Rank 0 sends a PING whenever it has been silent for ``HEARTBEAT_S``, so an idle follower's wait is
  bounded by the group timeout: a follower notices a dead or stopped rank 0 within ``--tp-timeout-s``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from zmqdisagg.errors import BadRequest, ZmqDisaggError
from zmqdisagg.protocol.tensor_meta import TensorMeta
from zmqdisagg.target.types import TargetBatch, TargetSettings, check_batch

logger = logging.getLogger(__name__)

PING, COMPUTE, SHUTDOWN = 0, 1, 2
HEARTBEAT_S = 1.0  # rank 0 pings followers after this much silence
OPS = ("eagle3", "dflash")


class RankFailed(ZmqDisaggError):
    """A tensor-parallel rank failed or left; the group is unusable and the server must exit.

    The server loop lets this through (it is not a per-request error): rank 0 exits, and clients see
    ``PeerTimeout`` for requests in flight. Restart ``zmqdisagg-serve --tp``; the log names the rank.
    """

    code = "RemoteError"


class ControlChannel:
    """Commands from rank 0 to every other rank, broadcast over a gloo group of CPU tensors."""

    def __init__(self, group: Any, src: int = 0) -> None:
        self.group = group
        self.src = src

    def send(self, kind: int, body: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
        payload = b""
        if body is not None or tensors:
            payload = json.dumps({"body": body or {},
                                  "tensors": [TensorMeta.of(k, t).to_wire() for k, t in tensors.items()]}).encode()
        self._bcast(torch.tensor([kind, len(payload)], dtype=torch.int64))
        if payload:
            self._bcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        for t in tensors.values():
            self._bcast(t)

    def recv(self) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
        head = torch.empty(2, dtype=torch.int64)
        self._bcast(head)
        kind, size = int(head[0]), int(head[1])
        if size == 0:
            return kind, {}, {}
        buf = torch.empty(size, dtype=torch.uint8)
        self._bcast(buf)
        wire = json.loads(bytes(buf.numpy()))
        tensors = {}
        for meta in (TensorMeta.from_wire(m) for m in wire["tensors"]):
            tensors[meta.name] = torch.empty(meta.shape, dtype=meta.torch_dtype)
            self._bcast(tensors[meta.name])
        return kind, dict(wire["body"]), tensors

    def _bcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, self.src, group=self.group)


class ShardedTarget:
    """Rank 0's view of a tensor-parallel target, with the ``TargetModel`` methods the server uses.

    ``local`` is rank 0's ``TargetModel`` over its shard. Embeddings, the final norm and ``lm_head``
    are replicated (see ``sharding.py``), so ``info``, ``resolve`` and ``head_weights`` are local and
    ``head_weights`` returns the full tensors.
    """

    def __init__(self, local: Any, channel: ControlChannel, check: Callable[[], None] | None = None) -> None:
        self._local = local
        self._channel = channel
        self._check = check  # raises RankFailed once a follower process is gone (spawned ranks)
        self._last_sent = time.monotonic()
        self._broken: str | None = None
        self._closed = False

    def info(self) -> Any:
        return self._local.info()

    def head_weights(self) -> dict[str, torch.Tensor]:
        return self._local.head_weights()

    def resolve(self, settings: TargetSettings, t2d: torch.Tensor | None = None) -> Any:
        return self._local.resolve(settings, t2d)

    def compute(self, op: str, batch: TargetBatch, settings: TargetSettings,
                t2d: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Validate, broadcast the request, run rank 0's shard; any failure after the broadcast is fatal."""
        if op not in OPS:
            raise BadRequest(f"unknown op {op!r}; the target computes one of {OPS}")
        settings, t2d = self._local.resolve(settings, t2d)
        info = self._local.info()
        batch = check_batch(batch, vocab_size=info.vocab_size, max_positions=info.max_positions)
        self._send(COMPUTE, {"op": op, "settings": settings.to_wire()}, batch.tensors())
        try:
            return self._local.compute(op, batch, settings, t2d)
        except Exception as e:
            raise self._fail(f"rank 0 failed inside a tensor-parallel forward ({type(e).__name__}: {e})") from e

    def keepalive(self) -> None:
        """Called by the server loop between messages: ping after silence, and watch the followers."""
        if self._check is not None:
            try:
                self._check()
            except RankFailed as e:
                self._broken = str(e)
                raise
        if time.monotonic() - self._last_sent >= HEARTBEAT_S:
            self._send(PING)

    def close(self) -> None:
        """Tell the followers to exit (unless the group is broken) and free rank 0's model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            try:
                self._channel.send(SHUTDOWN)
            except Exception as e:  # noqa: BLE001 - a follower already gone cannot be told
                logger.info("could not send shutdown to the other ranks: %s", e)
        self._local.close()

    def _send(self, kind: int, body: dict | None = None, tensors: dict | None = None) -> None:
        if self._broken is not None:
            raise RankFailed(self._broken)
        try:
            self._channel.send(kind, body, tensors)
        except Exception as e:
            raise self._fail(f"lost a tensor-parallel rank while broadcasting ({type(e).__name__}: {e})") from e
        self._last_sent = time.monotonic()

    def _fail(self, why: str) -> RankFailed:
        self._broken = f"{why}; the ranks are out of step, so this server stops. Restart zmqdisagg-serve"
        logger.error("%s", self._broken)
        return RankFailed(self._broken)


def follower_loop(local: Any, channel: ControlChannel, *, stop_requested: Callable[[], float | None],
                  grace_s: float = 5.0) -> int:
    """Run rank 0's commands on this rank's shard until SHUTDOWN; return the process exit code.

    Returns 0 on SHUTDOWN, or when a SIGTERM/SIGINT (``stop_requested()`` gives its time) is older than
    ``grace_s`` and rank 0 has not sent SHUTDOWN; 1 if rank 0 is lost or a forward fails.
    """
    while True:
        try:
            kind, body, tensors = channel.recv()
        except Exception as e:  # noqa: BLE001 - rank 0 died, stopped answering, or broke the group
            logger.error("lost rank 0 (%s: %s); exiting", type(e).__name__, e)
            return 1
        if kind == SHUTDOWN:
            logger.info("rank 0 said shutdown")
            return 0
        if kind == COMPUTE:
            try:
                s = TargetSettings.from_wire(body["settings"])
                local.compute(body["op"], TargetBatch(**tensors),
                              TargetSettings(aux_layer_ids=s.aux_layer_ids, dflash_layer_ids=s.dflash_layer_ids))
            except Exception:  # noqa: BLE001 - the group is out of step; rank 0 will notice
                logger.exception("forward failed on this rank; exiting so that rank 0 stops too")
                return 1
        signalled = stop_requested()
        if signalled is not None and time.monotonic() - signalled > grace_s:
            logger.warning("signalled %.1fs ago and rank 0 has not said shutdown; exiting", grace_s)
            return 0
