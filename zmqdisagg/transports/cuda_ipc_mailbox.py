"""The receive-slot mailbox of ``cuda_ipc`` push mode: a small shared-memory page the client writes.

In push mode the *client* owns receive slots on its own GPU and the server writes replies straight
into them. The server needs three facts from the client at any moment, without a round trip: which
slots exist (IPC mem handle, size), and which of them it may write into now. The client publishes
them here; the server only reads. The server creates the page (``offer`` names it), the client maps
it at ``accept`` and unlinks the name, so nothing outlives both processes (``sweep_stale`` removes a
dead server's page: the name follows the shm transport's pattern).

Layout (native-endian u64 words; one writer per field: the client)::

    0     magic | version
    8     slot count (written by the server at creation)
    16    attach word: 1 once the client has written its GPU UUID below and wants pushes
    24    client GPU UUID, ASCII, NUL-padded (64 bytes)
    128 + 128 r  slot r:  word  = gen << 32 | offers      <- the publication point
                          +8    gen   \
                          +16   size   | descriptor, covered by crc32 at +88
                          +24   IPC mem handle (64 bytes)
                          +88   crc32(+8 .. +88)

Free-list protocol (single writer per counter, so there is nothing to race):

* The client bumps ``offers`` of slot r each time it hands r to the server: once when it publishes a
  new generation (offers = 1), and once each time every view of a reply in r is gone and the GPU work
  that read them has finished.
* The server counts its ``grants`` of r (per generation, in its own memory). r is free iff
  ``offers - grants == 1``; taking it makes ``grants == offers``, and only the client can make it free
  again. The reply names (r, gen); the client checks that r was offered and not yet granted.
* Only the client changes a descriptor, and only for a slot it holds (granted back to it), so the
  server never writes into memory that is being reallocated. The u64 word is written with one aligned
  8-byte store (``memoryview.cast('Q')``), so (gen, offers) is read whole; a descriptor read while it
  changes fails its crc or its gen check and the slot is simply skipped for that reply.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import zlib
from dataclasses import dataclass

from zmqdisagg.errors import ProtocolMismatch

logger = logging.getLogger(__name__)

MAGIC = 0x7A6D71646973_0001  # "zmqdis" + layout version 1
HEADER = 128
RECORD = 128
HANDLE_BYTES = 64
MASK = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What the client published for slot r: its generation, size and IPC mem handle."""

    gen: int
    size: int
    handle: bytes


class Mailbox:
    """One mapped mailbox page. ``create`` (server) or ``attach`` (client); ``close`` is idempotent."""

    def __init__(self, path: str, mm: mmap.mmap, nslots: int) -> None:
        self.path, self.mm, self.nslots = path, mm, nslots
        self.words = memoryview(mm).cast("Q")
        self.closed = False

    @classmethod
    def create(cls, directory: str, nslots: int) -> "Mailbox":
        name = f"zmqdisagg-{os.getpid()}-mb{secrets.token_hex(6)}-0-0"
        path = os.path.join(directory, name)
        size = HEADER + RECORD * nslots
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        box = cls(path, mm, nslots)
        box.words[1] = nslots
        box.words[0] = MAGIC
        return box

    @classmethod
    def attach(cls, path: str) -> "Mailbox":
        """Map the server's page and unlink its name (both mappings stay valid)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise ProtocolMismatch(f"cuda_ipc mailbox {path} cannot be opened ({e}); are client and "
                                   "server on one host with the same /dev/shm?") from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        words = memoryview(mm).cast("Q")
        magic, nslots = words[0], words[1]
        words.release()
        if magic != MAGIC or size < HEADER + RECORD * nslots:
            mm.close()
            raise ProtocolMismatch(f"cuda_ipc mailbox {path} has another layout; upgrade both sides")
        return cls(path, mm, int(nslots))

    # -- client writes -----------------------------------------------------------------------------
    def set_client(self, uuid: str) -> None:
        raw = uuid.encode()[:64].ljust(64, b"\0")
        self.mm[24:88] = raw
        self.words[2] = 1

    def publish(self, r: int, desc: Descriptor, offers: int = 1) -> None:
        """Write slot r's descriptor, then its word (the publication point)."""
        base = self._base(r)
        body = desc.gen.to_bytes(8, "little") + desc.size.to_bytes(8, "little") + desc.handle
        if len(desc.handle) != HANDLE_BYTES:
            raise ValueError(f"an IPC mem handle has {HANDLE_BYTES} bytes, got {len(desc.handle)}")
        self.mm[base + 8:base + 88] = body
        self.mm[base + 88:base + 96] = zlib.crc32(body).to_bytes(8, "little")
        self.set_word(r, desc.gen, offers)

    def set_word(self, r: int, gen: int, offers: int) -> None:
        self.words[self._base(r) // 8] = (gen & MASK) << 32 | (offers & MASK)

    # -- server reads ------------------------------------------------------------------------------
    def client(self) -> str | None:
        """The client's GPU UUID once it attached for pushes, else None."""
        if self.words[2] != 1:
            return None
        uuid = bytes(self.mm[24:88]).rstrip(b"\0").decode(errors="replace")
        return uuid if uuid.startswith(("GPU-", "MIG-")) else None

    def word(self, r: int) -> tuple[int, int]:
        """(gen, offers) of slot r, read whole; gen 0 means never published."""
        w = self.words[self._base(r) // 8]
        return w >> 32, w & MASK

    def descriptor(self, r: int, gen: int) -> Descriptor | None:
        """Slot r's descriptor if it is intact and of generation ``gen``, else None (try again later)."""
        base = self._base(r)
        body = bytes(self.mm[base + 8:base + 88])
        crc = int.from_bytes(self.mm[base + 88:base + 96], "little")
        d = Descriptor(gen=int.from_bytes(body[:8], "little"), size=int.from_bytes(body[8:16], "little"),
                       handle=body[16:])
        return d if crc == zlib.crc32(body) and d.gen == gen and d.size > 0 else None

    def _base(self, r: int) -> int:
        if not 0 <= r < self.nslots:
            raise ProtocolMismatch(f"cuda_ipc receive slot {r} is outside the mailbox's {self.nslots}")
        return HEADER + RECORD * r

    def close(self, unlink: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.words.release()
        try:
            self.mm.close()
        except (BufferError, ValueError) as e:
            logger.warning("cuda_ipc mailbox %s still exported (%s); leaving it mapped", self.path, e)
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
