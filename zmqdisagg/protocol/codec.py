"""Encode and decode ``Header`` frames, and send/receive whole messages on ZMQ sockets.

The header is JSON (stdlib, no pickle, nothing executable). ``decode`` checks the schema version and
every field's type before anything else reads it, and raises ``ProtocolMismatch`` with a message that
says what was wrong. ``check_plain`` refuses anything but JSON scalars, lists and dicts in a body, and
caps list lengths, so no tensor can slip into a header even as a list of numbers.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any, Mapping, Sequence

import torch
import zmq

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.protocol.messages import MAX_HEADER_BYTES, SCHEMA_VERSION, Header
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes

MAX_LIST_LEN = 1024  # longer lists are data, and data travels in frames
_SCALARS = frozenset({str, int, float, bool, type(None)})  # exact types check_plain accepts without a look inside
_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # built once: json.dumps(**kw) builds one per call
_quote = encode_basestring_ascii  # a str as a JSON string literal, exactly as the encoder above writes it
_DECODER = json.JSONDecoder()
_SNDMORE, _RCVMORE = int(zmq.SNDMORE), int(zmq.RCVMORE)  # plain ints: zmq.Flag arithmetic costs µs per call


def check_plain(value: Any, where: str = "body") -> None:
    """Raise unless ``value`` is made only of JSON scalars, short lists and str-keyed dicts."""
    if type(value) in _SCALARS or value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_LEN:
            raise ProtocolMismatch(f"{where} holds a list of {len(value)} items; send data as a tensor frame")
        for i, v in enumerate(value):
            if type(v) not in _SCALARS:  # skip the call for the common case; ``where`` is built only on the way down
                check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolMismatch(f"{where} has a non-string key {k!r}")
            if type(v) not in _SCALARS:
                check_plain(v, f"{where}.{k}")
        return
    raise ProtocolMismatch(f"{where} holds a {type(value).__name__}; headers carry metadata only")


def encode(header: Header) -> bytes:
    """Serialize ``header`` to JSON bytes, refusing non-metadata content.

    The fixed fields are formatted directly (the bytes are those ``json.dumps(wire, separators=(",",
    ":"))`` gives, which tests check); only a non-empty body, tensor list or release list goes through
    the JSON encoder. A header whose fields are not the declared types takes the generic path.
    """
    body = header.body
    if body:
        body = body if type(body) is dict else dict(body)
        check_plain(body)
    h = header
    if type(h.op) is str and type(h.client_id) is str and type(h.version) is int and type(h.request_id) is int \
            and type(h.lane) is int:
        text = (f'{{"v":{h.version},"op":{_quote(h.op)},"cid":{_quote(h.client_id)},"rid":{h.request_id},'
                f'"lane":{h.lane},"body":{_json(body) if body else "{}"},'
                f'"tensors":{_json([m.to_wire() for m in h.tensors]) if h.tensors else "[]"},'
                f'"rel":{_json(list(h.releases)) if h.releases else "[]"}}}')
    else:
        text = _json(_wire(h, body))
    data = text.encode()
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolMismatch(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}; move data into frames")
    return data


def _wire(header: Header, body: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of ``header``, field by field (the generic encoder's input)."""
    return {"v": header.version, "op": header.op, "cid": header.client_id, "rid": header.request_id,
            "lane": header.lane, "body": dict(body), "tensors": [m.to_wire() for m in header.tensors],
            "rel": list(header.releases)}


def _field(wire: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = wire.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolMismatch(f"header field {key!r} is missing or not {kind}")
    return value


def _int(wire: dict, key: str) -> int:
    value = wire.get(key)
    return value if type(value) is int else _field(wire, key, int)  # JSON yields exact types: bool is not int


def _str(wire: dict, key: str) -> str:
    value = wire.get(key)
    return value if type(value) is str else _field(wire, key, str)


def decode(data: bytes | memoryview) -> Header:
    """Parse and validate a header frame; raises ``ProtocolMismatch`` on anything malformed."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolMismatch(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        wire = _loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolMismatch(f"header is not valid JSON: {e}") from None
    if not isinstance(wire, dict):
        raise ProtocolMismatch("header must be a JSON object")
    version = _int(wire, "v")
    if version != SCHEMA_VERSION:
        raise ProtocolMismatch(
            f"peer speaks schema version {version}, this side speaks {SCHEMA_VERSION}; "
            "install the same zmqdisagg version on server and trainer")
    body = _field(wire, "body", dict)
    if body:
        check_plain(body)
    releases = _field(wire, "rel", list)
    if releases and not all(type(r) is int for r in releases):
        raise ProtocolMismatch("header field 'rel' must list integer slot ids")
    op, client_id, request_id, lane = _str(wire, "op"), _str(wire, "cid"), _int(wire, "rid"), _int(wire, "lane")
    tensors = _field(wire, "tensors", list)
    return Header(op=op, version=version, client_id=client_id, request_id=request_id, lane=lane, body=body,
                  tensors=tuple(TensorMeta.from_wire(m) for m in tensors) if tensors else (),
                  releases=tuple(releases))


def _loads(data: bytes | memoryview) -> Any:
    """UTF-8 JSON straight to the decoder; anything else gets ``json.loads``' own encoding detection."""
    try:
        return _DECODER.decode(str(data, "utf-8"))
    except ValueError:  # also UnicodeDecodeError: retry as json.loads would read the bytes (BOM, UTF-16)
        return json.loads(bytes(data))


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
    """Send ``[*envelope, header, *frames]``; tensor frames go zero-copy.

    A message of small parts only (every control reply) is copied, part by part with a plain-int
    flag: for a few hundred bytes a copy costs less than the ``zmq.Frame`` of a zero-copy send, and
    ``send_multipart`` spends more on ``zmq.Flag`` arithmetic than on the send itself.
    """
    data = encode(header)
    if frames:
        sock.send_multipart([*envelope, data, *frames], copy=False)
        return
    for part in envelope:
        sock.send(part, _SNDMORE)
    sock.send(data)


def recv(sock: zmq.Socket, flags: int = 0, *, routed: bool = False) -> list[Any]:
    """One whole message: the envelope (``routed``: a ROUTER's, up to the empty delimiter) and the
    header as ``bytes``, the frames after them as zero-copy ``zmq.Frame``s. Raises ``zmq.Again``
    under ``zmq.NOBLOCK`` when nothing is queued."""
    more = sock.getsockopt
    parts: list[Any] = [sock.recv(flags)]
    if routed:
        while parts[-1] and more(_RCVMORE):  # routing ids, then the empty delimiter
            parts.append(sock.recv())
        if more(_RCVMORE):
            parts.append(sock.recv())  # the header
    while more(_RCVMORE):
        parts.append(sock.recv(copy=False))
    return parts
