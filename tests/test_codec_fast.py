"""The control path's fast paths give exactly what the generic ones gave.

The formatted header encoder must write the bytes ``json.dumps`` writes, and whatever a fuzzer does to
those bytes, ``decode`` must answer with a ``Header`` or a ``ProtocolMismatch``, nothing else.
``codec.send``/``codec.recv`` copy the small parts and keep tensor frames zero-copy, and the server's
busy fraction, now a running total, equals the sum over its intervals.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import SCHEMA_VERSION, Header
from zmqdisagg.server.handlers import ServerState
from zmqdisagg.server.utilisation import Utilisation

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
ids = st.integers(0, 2**63)
metas = codec.tensor_frames({"input_ids": torch.zeros(2, 3, dtype=torch.int64), "m": torch.ones(4).bfloat16()})[0]


def _reference(h: Header) -> bytes:
    """What ``encode`` wrote before it had a fast path."""
    wire = {"v": h.version, "op": h.op, "cid": h.client_id, "rid": h.request_id, "lane": h.lane,
            "body": dict(h.body), "tensors": [m.to_wire() for m in h.tensors], "rel": list(h.releases)}
    return json.dumps(wire, separators=(",", ":"), allow_nan=False).encode()


@settings(max_examples=300, deadline=None)
@given(op=st.text(max_size=10), cid=st.text(max_size=34), rid=ids, lane=ids,
       body=st.dictionaries(st.text(max_size=6), plain, max_size=4), with_tensors=st.booleans(),
       releases=st.lists(st.integers(0, 2**40), max_size=5))
def test_fast_encoder_writes_the_generic_bytes_and_round_trips(op, cid, rid, lane, body, with_tensors, releases):
    h = Header(op=op, client_id=cid, request_id=rid, lane=lane, body=body,
               tensors=metas if with_tensors else (), releases=tuple(releases))
    data = codec.encode(h)
    assert data == _reference(h)
    assert codec.decode(data) == h


def test_off_type_fields_take_the_generic_path():
    for h in (Header(op="info", request_id=True), Header(op="info", version=1.0), Header(op="info", lane=None)):
        assert codec.encode(h) == _reference(h)
        with pytest.raises(ProtocolMismatch):
            codec.decode(codec.encode(h))


def test_check_plain_still_refuses_what_hides_in_containers():
    for body in ({"a": [1, {"b": torch.zeros(1)}]}, {"a": (b"x",)}, {"a": {"b": {1: 2}}}, {"a": [[0] * 5000]}):
        with pytest.raises(ProtocolMismatch):
            codec.encode(Header(op="x", body=body))
    codec.check_plain({"a": [1, 2.5, None, True, "s", {"b": []}]})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_fast_headers_get_a_header_or_protocol_mismatch(data):
    h = Header(op="eagle3", client_id="c", request_id=3, lane=1, body={"k": [1]}, tensors=metas, releases=(2,))
    wire = json.loads(codec.encode(h))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(wire) + ["extra"]))
        if data.draw(st.booleans()):
            wire.pop(key, None)
        else:
            wire[key] = data.draw(plain)
    raw = json.dumps(wire).encode()
    if data.draw(st.booleans()):  # and corrupt a byte
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    try:
        out = codec.decode(raw)
    except ProtocolMismatch:
        return
    assert isinstance(out, Header) and out.version == SCHEMA_VERSION


def test_decode_reads_what_json_loads_reads():
    h = Header(op="info", client_id="é")
    text = json.dumps(json.loads(codec.encode(h)), ensure_ascii=False)
    for raw in (text.encode("utf-8-sig"), text.encode("utf-16"), text.encode()):
        assert codec.decode(raw) == h
    assert codec.decode(memoryview(codec.encode(h))) == h


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router, req, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REQ), ctx.socket(zmq.DEALER)
    for s in (router, req, dealer):
        s.setsockopt(zmq.LINGER, 0)
    router.bind("inproc://codec-fast")
    req.connect("inproc://codec-fast")
    dealer.connect("inproc://codec-fast")
    yield router, req, dealer
    ctx.destroy(linger=0)


def test_send_and_recv_copy_small_parts_and_keep_frames_zero_copy(pair):
    router, req, dealer = pair
    with pytest.raises(zmq.Again):
        codec.recv(router, zmq.NOBLOCK, routed=True)
    payload = torch.arange(4096, dtype=torch.uint8)
    codec.send(req, Header(op="info", client_id="c"), [payload.numpy()])
    parts = codec.recv(router, routed=True)
    assert all(isinstance(p, bytes) for p in parts[:3]) and parts[1] == b""
    assert isinstance(parts[3], zmq.Frame) and bytes(parts[3].buffer) == payload.numpy().tobytes()
    assert codec.decode(parts[2]).op == "info"
    codec.send(router, Header(op="ok", client_id="c"), envelope=parts[:2])
    back = codec.recv(req)
    assert len(back) == 1 and codec.decode(back[0]) == Header(op="ok", client_id="c")
    dealer.send_multipart([b"no", b"delimiter"])  # no empty frame: every part copied, the server drops it
    parts = codec.recv(router, routed=True)
    assert len(parts) == 3 and all(isinstance(p, bytes) for p in parts) and b"" not in parts


def test_busy_fraction_equals_the_sum_over_intervals():
    rnd = random.Random(0)
    for _ in range(50):
        util, t = Utilisation(window_s=10.0), 0.0
        util.started_at = 0.0
        for _ in range(rnd.randint(0, 60)):
            start = t + rnd.random()
            t = start + rnd.random()
            util.busy(start, t)
        now = t + rnd.choice([0.0, 0.5, 3.0]) - rnd.choice([0.0, 0.3])
        got = util.busy_fraction(now)
        lo = max(now - 10.0, 0.0)
        spans = list(util._busy)  # what the window still holds; the running total must equal its sum
        want = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in spans) / (now - lo) if now > lo else 0.0
        assert got == pytest.approx(min(1.0, want), abs=1e-9)


def test_info_wire_follows_the_models_info():
    class Model:
        def __init__(self, n):
            self.n = n

        def info(self):
            return self.n

    state = ServerState(model=Model(None), identity=None, config=None)
    state.model.n = type("Info", (), {"to_wire": lambda self: {"id": id(self)}})()
    first = state.info_wire()
    assert state.info_wire() is first  # converted once
    state.model.n = type(state.model.n)()
    assert state.info_wire() == {"id": id(state.model.n)}
