"""Every bad input gets its typed error reply, and a valid client keeps being served meanwhile."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import zmq

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import BadRequest, ConfigError
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import SCHEMA_VERSION, Header
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.types import TargetBatch, TargetSettings
from zmqdisagg.topology import local_identity

MAX_REQUEST = 1 << 16


@pytest.fixture(scope="module")
def server():
    with spawn_server("configs/tiny-llama.json", extra=("--max-request-bytes", str(MAX_REQUEST),
                                                         "--max-tokens", "512")) as srv:
        yield srv


@pytest.fixture()
def raw(server):
    """A bare REQ socket speaking the protocol by hand, and a well-behaved client beside it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20000)
    sock.connect(server.address)
    good = RemoteTarget([server.address], ClientConfig(transport="inline"))
    yield sock, good
    good.close()
    sock.close(0)
    ctx.term()


def _ask(sock, parts) -> Header:
    sock.send_multipart(parts)
    reply = sock.recv_multipart()
    return codec.decode(reply[0])


def _hello(sock, cid: str) -> None:
    h = Header(op="hello", client_id=cid, body={"identity": local_identity().to_wire(), "transport": "inline"})
    assert _ask(sock, [codec.encode(h)]).op == "ok"


def _data(cid: str, tensors: dict, rid: int = 1) -> list:
    metas, frames = codec.tensor_frames(tensors)
    return [codec.encode(Header(op="eagle3", client_id=cid, request_id=rid, tensors=metas)), *[bytes(f) for f in frames]]


def _still_served(good: RemoteTarget) -> None:
    ids = torch.arange(10).reshape(1, 10)
    out = good.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert out["aux_hidden"].shape[:2] == (1, 10)


def _code(h: Header) -> str:
    assert h.op == "error", h
    return h.body["code"]


def test_malformed_frames(raw):
    sock, good = raw
    assert _code(_ask(sock, [b"\x00\xffgarbage"])) == "ProtocolMismatch"
    assert _code(_ask(sock, [b'{"v": 1}'])) == "ProtocolMismatch"
    _still_served(good)


def test_wrong_version(raw):
    sock, good = raw
    wire = json.loads(codec.encode(Header(op="info")))
    wire["v"] = SCHEMA_VERSION + 7
    reply = _ask(sock, [json.dumps(wire).encode()])
    assert _code(reply) == "ProtocolMismatch" and "same zmqdisagg version" in reply.body["message"]
    _still_served(good)


def test_unknown_op_and_unknown_client(raw):
    sock, good = raw
    assert _code(_ask(sock, [codec.encode(Header(op="launch_missiles"))])) == "BadRequest"
    ids = torch.zeros(1, 4, dtype=torch.int64)
    reply = _ask(sock, _data("never-said-hello", {"input_ids": ids, "attention_mask": ids}))
    assert _code(reply) == "UnknownClient" and "hello" in reply.body["message"]
    _still_served(good)


def test_oversize_request(raw):
    sock, good = raw
    cid = uuid.uuid4().hex
    _hello(sock, cid)
    ids = torch.zeros(1, MAX_REQUEST // 8, dtype=torch.int64)
    reply = _ask(sock, _data(cid, {"input_ids": ids, "attention_mask": ids}))
    assert _code(reply) == "BadRequest" and "limit" in reply.body["message"]
    _still_served(good)


@pytest.mark.parametrize("case", ["out_of_range", "negative", "float_ids", "shape_mismatch", "missing_mask",
                                  "too_many_tokens", "three_d"])
def test_bad_tensors_get_bad_request(raw, case):
    sock, good = raw
    cid = uuid.uuid4().hex
    _hello(sock, cid)
    vocab = good.info().vocab_size
    ids = torch.zeros(2, 8, dtype=torch.int64)
    mask = torch.ones_like(ids)
    tensors = {
        "out_of_range": {"input_ids": ids + vocab, "attention_mask": mask},
        "negative": {"input_ids": ids - 1, "attention_mask": mask},
        "float_ids": {"input_ids": ids.float(), "attention_mask": mask},
        "shape_mismatch": {"input_ids": ids, "attention_mask": mask[:, :5]},
        "missing_mask": {"input_ids": ids},
        "too_many_tokens": {"input_ids": torch.zeros(2, 300, dtype=torch.int64),
                            "attention_mask": torch.ones(2, 300, dtype=torch.int64)},
        "three_d": {"input_ids": ids[None], "attention_mask": mask[None]},
    }[case]
    reply = _ask(sock, _data(cid, tensors))
    assert _code(reply) == "BadRequest", reply.body
    _still_served(good)


def test_typed_errors_surface_in_the_client(raw):
    _, good = raw
    vocab = good.info().vocab_size
    with pytest.raises(BadRequest, match="must lie in"):
        ids = torch.full((1, 4), vocab + 3)
        good.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
    with pytest.raises(ConfigError, match="outside"):
        good.configure(TargetSettings(aux_layer_ids=(0, 1, 99)))
    with pytest.raises(ConfigError, match="t2d"):
        good.configure(TargetSettings(), torch.ones(vocab + 1, dtype=torch.bool))
    _still_served(good)


def test_stats_report_errors_and_choices(raw):
    _, good = raw
    stats = good.stats()
    (only,) = stats.values()
    assert only["you"]["transport"] == "inline" and "forced" in only["you"]["reason"]
    assert only["errors"] >= 0 and only["requests"] >= 1


def test_no_tensor_travels_inside_a_reply_header(raw):
    """Over inline, every tensor byte is in a frame of its own; the header holds only their metas."""
    sock, good = raw
    cid = uuid.uuid4().hex
    _hello(sock, cid)
    ids = torch.arange(200).reshape(2, 100) % good.info().vocab_size
    metas, frames = codec.tensor_frames({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    sock.send_multipart([codec.encode(Header(op="eagle3", client_id=cid, request_id=1, tensors=metas)),
                         *[bytes(f) for f in frames]])
    reply = sock.recv_multipart()
    header = codec.decode(reply[0])
    assert header.op == "ok"
    payload = sum(m.nbytes for m in header.tensors)
    assert [len(f) for f in reply[1:]] == [m.nbytes for m in header.tensors]
    assert payload > 100_000 and len(reply[0]) < 2_000, (payload, len(reply[0]))
    raw_json = json.loads(reply[0])
    codec.check_plain(raw_json["body"])  # only short lists of plain values


def test_bench_op_moves_known_bytes_and_checks_its_size(raw, server):
    from zmqdisagg.errors import BadRequest as Bad
    from zmqdisagg.protocol.messages import trial_pattern
    with RemoteTarget([server.address], ClientConfig(transport="shm")) as remote:
        conn = remote._servers[0]
        for nbytes in (1, 4097, 3 << 20):
            got = conn._call("bench", {"nbytes": nbytes})[1]["payload"]
            assert torch.equal(got, trial_pattern(nbytes))
        for bad in (0, -5, "10", 1 << 40):
            with pytest.raises(Bad, match="max-bench-bytes"):
                conn._call("bench", {"nbytes": bad})
