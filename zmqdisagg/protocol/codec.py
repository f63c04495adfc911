"""Encode and decode ``Header`` frames, and send/receive whole messages on ZMQ sockets.

The header is JSON (stdlib, no pickle, nothing executable). ``decode`` checks the schema version and
every field's type before anything else reads it, and raises ``ProtocolMismatch`` with a message that
says what was wrong. ``check_plain`` refuses anything but JSON scalars, lists and dicts in a body, and
caps list lengths, so no tensor can slip into a header even as a list of numbers.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import zmq

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.protocol.messages import MAX_HEADER_BYTES, SCHEMA_VERSION, Header
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes

MAX_LIST_LEN = 1024  # longer lists are data, and data travels in frames


def check_plain(value: Any, where: str = "body") -> None:
    """Raise unless ``value`` is made only of JSON scalars, short lists and str-keyed dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_LEN:
            raise ProtocolMismatch(f"{where} holds a list of {len(value)} items; send data as a tensor frame")
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolMismatch(f"{where} has a non-string key {k!r}")
            check_plain(v, f"{where}.{k}")
        return
    raise ProtocolMismatch(f"{where} holds a {type(value).__name__}; headers carry metadata only")


def encode(header: Header) -> bytes:
    """Serialize ``header`` to JSON bytes, refusing non-metadata content."""
    check_plain(dict(header.body))
    wire = {
        "v": header.version, "op": header.op, "cid": header.client_id, "rid": header.request_id,
        "lane": header.lane, "body": dict(header.body),
        "tensors": [m.to_wire() for m in header.tensors], "rel": list(header.releases),
    }
    data = json.dumps(wire, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolMismatch(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}; move data into frames")
    return data


def _field(wire: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = wire.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolMismatch(f"header field {key!r} is missing or not {kind}")
    return value


def decode(data: bytes | memoryview) -> Header:
    """Parse and validate a header frame; raises ``ProtocolMismatch`` on anything malformed."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolMismatch(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        wire = json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolMismatch(f"header is not valid JSON: {e}") from None
    if not isinstance(wire, dict):
        raise ProtocolMismatch("header must be a JSON object")
    version = _field(wire, "v", int)
    if version != SCHEMA_VERSION:
        raise ProtocolMismatch(
            f"peer speaks schema version {version}, this side speaks {SCHEMA_VERSION}; "
            "install the same zmqdisagg version on server and trainer")
    body = _field(wire, "body", dict)
    check_plain(body)
    releases = _field(wire, "rel", list)
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in releases):
        raise ProtocolMismatch("header field 'rel' must list integer slot ids")
    return Header(
        op=_field(wire, "op", str), version=version, client_id=_field(wire, "cid", str),
        request_id=_field(wire, "rid", int), lane=_field(wire, "lane", int), body=body,
        tensors=tuple(TensorMeta.from_wire(m) for m in _field(wire, "tensors", list)),
        releases=tuple(releases),
    )


def tensor_frames(tensors: dict[str, torch.Tensor]) -> tuple[tuple[TensorMeta, ...], list[Any]]:
    """Metas (offset 0, one per frame) and zero-copy byte buffers for CPU ``tensors``."""
    metas, frames = [], []
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ProtocolMismatch(f"tensor {name!r} is on {t.device}; frames carry CPU tensors only")
        metas.append(TensorMeta.of(name, t))
        frames.append(as_bytes(t).numpy())
    return tuple(metas), frames


def frames_to_tensors(metas: Sequence[TensorMeta], frames: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Rebuild owned tensors from raw frames, checking each frame's size against its meta."""
    if len(metas) != len(frames):
        raise ProtocolMismatch(f"{len(metas)} tensors described but {len(frames)} frames received")
    out = {}
    for meta, frame in zip(metas, frames):
        buf = memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame)
        if buf.nbytes != meta.nbytes:
            raise ProtocolMismatch(f"frame of tensor {meta.name!r} has {buf.nbytes} bytes, expected {meta.nbytes}")
        t = torch.empty(meta.shape, dtype=meta.torch_dtype)
        if meta.nbytes:
            as_bytes(t).numpy()[:] = buf.cast("B")
        out[meta.name] = t
    return out


def send(sock: zmq.Socket, header: Header, frames: Sequence[Any] = (),
         envelope: Sequence[bytes] = ()) -> None:
    """Send ``[*envelope, header, *frames]``; frames go zero-copy."""
    parts = [*envelope, encode(header), *frames]
    sock.send_multipart(parts, copy=False)
