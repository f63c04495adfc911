"""Control-plane messages: one frozen ``Header`` per message, followed by raw frames.

A message on the wire is a list of ZMQ frames::

    frame 0      JSON header (this module's ``Header``), at most MAX_HEADER_BYTES
    frame 1..n   raw bytes of the request's tensors, one frame per ``Header.tensors`` entry
                 (only for requests that carry tensors, and for the ``inline`` transport's replies)

Ops a client sends and what the server answers (``ok`` or ``error``)::

    hello      identity + allowed transports  ->  chosen transport, its offer, model info
    trial      -                              ->  a small known tensor through the transport
    info       -                              ->  model info
    weights    -                              ->  embed_tokens / lm_head / norm (like a data reply)
    configure  layer ids / teacher mode, t2d  ->  effective settings
    eagle3     input_ids, attention_mask      ->  tensor metas + the transport's delivery note
    dflash     input_ids, attention_mask      ->  tensor metas + the transport's delivery note
    bench      nbytes                         ->  that many known bytes through the transport (benchmarks)
    release    slot ids                       ->  ok
    stats      -                              ->  counters
    bye        -                              ->  ok (server frees everything of this client)

Every data request carries ``request_id`` and ``lane``; a repeated ``(client_id, lane, request_id)``
gets the very same reply again and never another request's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from zmqdisagg.protocol.tensor_meta import TensorMeta

SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024

HELLO, TRIAL, INFO, WEIGHTS, CONFIGURE, EAGLE3, DFLASH, BENCH, RELEASE, STATS, BYE = (
    "hello", "trial", "info", "weights", "configure", "eagle3", "dflash", "bench", "release", "stats", "bye")
OK, ERROR = "ok", "error"
REQUEST_OPS = frozenset({HELLO, TRIAL, INFO, WEIGHTS, CONFIGURE, EAGLE3, DFLASH, BENCH, RELEASE, STATS, BYE})
DATA_OPS = frozenset({TRIAL, WEIGHTS, EAGLE3, DFLASH, BENCH})


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    """The metadata of one message. ``body`` holds op-specific JSON values, never tensor data."""

    op: str
    version: int = SCHEMA_VERSION
    client_id: str = ""
    request_id: int = 0
    lane: int = 0
    body: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorMeta, ...] = ()
    releases: tuple[int, ...] = ()  # slot ids the client has finished with (piggybacked release)

    def reply(self, body: Mapping[str, Any] | None = None,
              tensors: tuple[TensorMeta, ...] = ()) -> "Header":
        """The ``ok`` answer to this request, echoing its ids."""
        return Header(op=OK, client_id=self.client_id, request_id=self.request_id,
                      lane=self.lane, body=dict(body or {}), tensors=tensors)

    def error(self, code: str, message: str) -> "Header":
        """The ``error`` answer to this request, echoing its ids."""
        return Header(op=ERROR, client_id=self.client_id, request_id=self.request_id,
                      lane=self.lane, body={"code": code, "message": message})


def trial_pattern(nbytes: int = 4096) -> torch.Tensor:
    """The known bytes a ``trial`` request moves through a new transport (no run of equal bytes)."""
    return torch.arange(nbytes, dtype=torch.int64).remainder(251).to(torch.uint8)
