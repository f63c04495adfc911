"""``TensorMeta``: how one tensor is described on the control plane.

A tensor never travels inside a header. The header carries a ``TensorMeta`` per tensor, and the bytes
travel elsewhere: as a raw ZMQ frame (``inline`` and request tensors), in a shared-memory or CUDA slot
at ``offset`` (``shm``, ``cuda_ipc``), or through a communicator (``nccl``). ``nbytes`` lets every
receiver check sizes before it touches memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from zmqdisagg.errors import ProtocolMismatch

# Wire names of the dtypes we move. Anything else is refused at encode time.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of ``dtype``; raises for dtypes the protocol does not carry."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolMismatch(
            f"dtype {dtype} cannot travel; cast to one of {sorted(DTYPES)}"
        ) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorMeta:
    """Name, dtype, shape and placement of one tensor whose bytes travel outside the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ProtocolMismatch(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise ProtocolMismatch(f"tensor {self.name!r} has an invalid shape {self.shape!r}")
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.nbytes != expected or self.offset < 0:
            raise ProtocolMismatch(
                f"tensor {self.name!r}: nbytes={self.nbytes} offset={self.offset} do not match "
                f"shape {self.shape} of {self.dtype} ({expected} bytes)"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, offset: int = 0) -> "TensorMeta":
        """Describe ``tensor`` as it will be laid out contiguously at ``offset``."""
        return cls(
            name=name,
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            offset=offset,
            nbytes=tensor.numel() * tensor.element_size(),
        )

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def from_wire(cls, d: Any) -> "TensorMeta":
        try:
            return cls(name=str(d["name"]), dtype=str(d["dtype"]),
                       shape=tuple(int(x) for x in d["shape"]),
                       offset=int(d["offset"]), nbytes=int(d["nbytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolMismatch(f"malformed tensor description {d!r}: {e}") from None


def layout(tensors: dict[str, torch.Tensor], align: int = 256) -> tuple[list[TensorMeta], int]:
    """Pack ``tensors`` back to back, each start aligned to ``align`` bytes; return metas and total size."""
    metas, offset = [], 0
    for name, t in tensors.items():
        meta = TensorMeta.of(name, t, offset)
        metas.append(meta)
        offset += -(-meta.nbytes // align) * align
    return metas, offset


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (any dtype), for byte-exact copies."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """View ``buf[meta.offset : meta.offset + meta.nbytes]`` (uint8) as the tensor ``meta`` describes."""
    end = meta.offset + meta.nbytes
    if end > buf.numel():
        raise ProtocolMismatch(f"tensor {meta.name!r} ends at byte {end}, past the {buf.numel()}-byte buffer")
    return buf[meta.offset:end].view(meta.torch_dtype).reshape(meta.shape)
