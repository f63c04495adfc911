"""The header codec: round trips, version checks, malformed input, and no tensor in a header."""

from __future__ import annotations

import json

import pytest
import torch

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import MAX_HEADER_BYTES, SCHEMA_VERSION, Header
from zmqdisagg.protocol.tensor_meta import TensorMeta, layout


def test_round_trip_keeps_every_field():
    metas, _ = codec.tensor_frames({"input_ids": torch.arange(6).reshape(2, 3),
                                    "x": torch.zeros(4, dtype=torch.bfloat16)})
    h = Header(op="eagle3", client_id="c1", request_id=7, lane=2, body={"a": [1, {"b": None}]},
               tensors=metas, releases=(3, 4))
    assert codec.decode(codec.encode(h)) == h


def test_wrong_version_names_the_fix():
    wire = json.loads(codec.encode(Header(op="info")))
    wire["v"] = SCHEMA_VERSION + 1
    with pytest.raises(ProtocolMismatch, match="same zmqdisagg version"):
        codec.decode(json.dumps(wire).encode())


@pytest.mark.parametrize("raw", [b"\xff\x00", b"[]", b"{}", b'{"v":1,"op":3}', b"not json",
                                 b'{"v":1,"op":"x","cid":"","rid":true,"lane":0,"body":{},"tensors":[],"rel":[]}'])
def test_malformed_headers_raise_protocol_mismatch(raw):
    with pytest.raises(ProtocolMismatch):
        codec.decode(raw)


def test_tensor_cannot_enter_a_header():
    with pytest.raises(ProtocolMismatch, match="metadata only"):
        codec.encode(Header(op="eagle3", body={"x": torch.zeros(3)}))
    with pytest.raises(ProtocolMismatch, match="tensor frame"):
        codec.encode(Header(op="eagle3", body={"x": list(range(5000))}))
    with pytest.raises(ProtocolMismatch):
        codec.encode(Header(op="eagle3", body={"x": b"raw bytes"}))


def test_oversize_header_is_refused():
    with pytest.raises(ProtocolMismatch):
        codec.decode(b" " * (MAX_HEADER_BYTES + 1))


def test_tensor_meta_checks_sizes():
    with pytest.raises(ProtocolMismatch):
        TensorMeta(name="a", dtype="float32", shape=(2, 2), offset=0, nbytes=15)
    with pytest.raises(ProtocolMismatch):
        TensorMeta(name="a", dtype="complex", shape=(1,), offset=0, nbytes=8)
    with pytest.raises(ProtocolMismatch):
        TensorMeta(name="a", dtype="float32", shape=(-1,), offset=0, nbytes=0)


def test_frames_round_trip_bitwise_for_every_dtype():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(), "i64": torch.randint(-9, 9, (2, 3), generator=g),
        "mask": torch.rand(6, generator=g) > 0.5, "empty": torch.zeros(0, 3),
    }
    metas, frames = codec.tensor_frames(tensors)
    back = codec.frames_to_tensors(metas, [bytes(f) for f in frames])
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8) if v.numel() else back[k],
                                                        v.view(torch.uint8) if v.numel() else v)


def test_frame_size_mismatch_is_caught():
    metas, frames = codec.tensor_frames({"a": torch.zeros(4)})
    with pytest.raises(ProtocolMismatch, match="expected 16"):
        codec.frames_to_tensors(metas, [b"\x00" * 12])
    with pytest.raises(ProtocolMismatch, match="frames received"):
        codec.frames_to_tensors(metas, [])


def test_layout_aligns_every_tensor():
    metas, total = layout({"a": torch.zeros(3), "b": torch.zeros(100, dtype=torch.bfloat16), "c": torch.zeros(1)})
    assert [m.offset % 256 for m in metas] == [0, 0, 0]
    assert metas[1].offset >= metas[0].offset + metas[0].nbytes
    assert total >= metas[-1].offset + metas[-1].nbytes
