"""Fuzzing the ROUTER: 10,000+ random and mutated messages, each answered by a typed error (or a
valid reply when the mutation happens to be valid), while a real client interleaved with the fuzzer
keeps getting bit-exact results."""

from __future__ import annotations

import json

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import _BY_CODE
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import REQUEST_OPS, Header
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch
from zmqdisagg.topology import local_identity

KNOWN_CODES = set(_BY_CODE)
COUNT = {"sent": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)


def _valid_wire(op: str) -> dict:
    ids = torch.zeros(1, 4, dtype=torch.int64)
    metas, _ = codec.tensor_frames({"input_ids": ids, "attention_mask": ids})
    body = {"identity": local_identity().to_wire(), "transport": "inline"} if op == "hello" else {}
    return json.loads(codec.encode(Header(op=op, client_id="fuzz", request_id=1, body=body, tensors=metas)))


@st.composite
def messages(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["bytes", "mutated", "mutated", "tensor_meta"]))
    frames = draw(st.lists(st.binary(max_size=64), max_size=3))
    if kind == "bytes":
        return [draw(st.binary(max_size=256)), *frames]
    wire = _valid_wire(draw(st.sampled_from(sorted(REQUEST_OPS) + ["nope"])))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(sorted(wire) + ["extra"]))
            if draw(st.booleans()):
                wire.pop(key, None)
            else:
                wire[key] = draw(json_values)
    else:
        metas = wire.get("tensors") or [{}]
        metas[0] = {**metas[0], **draw(st.dictionaries(st.sampled_from(["name", "dtype", "shape", "offset", "nbytes"]),
                                                        json_values, max_size=3))}
        wire["tensors"] = metas
    return [json.dumps(wire).encode(), *frames]


@pytest.fixture(scope="module")
def fuzz_target():
    local = load_target("configs/tiny-llama.json")
    ids = torch.arange(16).reshape(2, 8)
    batch = TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))
    want = local.eagle3(batch)
    with spawn_server("configs/tiny-llama.json") as srv:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(srv.address)
        with RemoteTarget([srv.address], ClientConfig(transport="shm")) as good:
            yield sock, good, batch, want
            assert COUNT["sent"] >= 10_000, f"only {COUNT['sent']} fuzzed messages were sent"
            got = good.eagle3(batch)
            assert all(torch.equal(got[k], want[k]) for k in want)
        sock.close(0)
        ctx.term()


@settings(max_examples=10_000, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(parts=messages())
def test_router_answers_every_fuzzed_message_with_a_typed_reply(fuzz_target, parts):
    sock, good, batch, want = fuzz_target
    sock.send_multipart(parts)
    reply = codec.decode(sock.recv_multipart()[0])
    assert reply.op in ("ok", "error")
    if reply.op == "error":
        assert reply.body["code"] in KNOWN_CODES, reply.body
        assert isinstance(reply.body["message"], str) and reply.body["message"]
    COUNT["sent"] += 1
    if COUNT["sent"] % 500 == 0:  # a valid client interleaved with the fuzzer keeps getting exact results
        got = good.eagle3(batch)
        assert all(torch.equal(got[k], want[k]) for k in want)
