"""``inline``: tensor bytes travel as ZMQ frames right behind the reply header.

Works between any two peers that can reach each other, so it is the last rung of the ladder. The
server hands ZMQ zero-copy views of its (CPU) tensors; the client copies each frame once into a tensor
it owns, then moves it to its device. Nothing is held between requests, so there is no slot to release.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from zmqdisagg.protocol.codec import frames_to_tensors, tensor_frames
from zmqdisagg.protocol.tensor_meta import TensorMeta
from zmqdisagg.transports.base import Delivery, TransportContext


class InlineTransport:
    """Bytes as frames; stateless apart from the device it delivers to."""

    name = "inline"

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.closed = False

    def offer(self) -> dict[str, Any]:
        return {}

    def accept(self, offer: Mapping[str, Any]) -> None:
        return None

    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery:
        metas, frames = tensor_frames({k: v.detach().cpu() for k, v in tensors.items()})
        return Delivery(note={}, metas=metas, frames=frames)

    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = frames_to_tensors(metas, frames)
        if self.ctx.device != "cpu":
            out = {k: v.to(self.ctx.device) for k, v in out.items()}
        return out

    def release(self, slot: int) -> None:
        return None

    def close(self) -> None:
        self.closed = True
