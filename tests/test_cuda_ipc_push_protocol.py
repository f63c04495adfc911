"""cuda_ipc push mode without a GPU: the mailbox layout and the receive-slot free-list protocol.

Server and client sides each map the same page (as two processes would); the tests drive the
protocol by hand and check the one invariant that matters: the server never gets a slot the client
has not offered, and a slot comes back exactly once per release.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.transports.cuda_ipc_mailbox import MASK, Descriptor, Mailbox
from zmqdisagg.transports.cuda_ipc_slots import PUSH, RETIRE, ClientBook, ServerGrants

H = bytes(range(64))  # a stand-in IPC mem handle


@pytest.fixture
def pair(tmp_path):
    server = Mailbox.create(str(tmp_path), 4)
    client = Mailbox.attach(server.path)
    yield ServerGrants(server), ClientBook(client)
    client.close()
    server.close(unlink=True)
    server.close(unlink=True)  # idempotent


def test_attach_unlinks_and_maps_the_same_page(tmp_path):
    server = Mailbox.create(str(tmp_path), 3)
    assert os.path.basename(server.path).startswith("zmqdisagg-")
    client = Mailbox.attach(server.path)
    assert not os.path.exists(server.path) and client.nslots == 3
    assert server.client() is None
    client.set_client("GPU-1234")
    assert server.client() == "GPU-1234"
    client.publish(2, Descriptor(gen=7, size=1 << 20, handle=H), offers=1)
    assert server.word(2) == (7, 1)
    assert server.descriptor(2, 7) == Descriptor(gen=7, size=1 << 20, handle=H)
    assert server.descriptor(2, 8) is None  # a stale generation is not accepted
    client.close()
    server.close(unlink=True)


def test_torn_descriptor_is_skipped(pair):
    grants, book = pair
    book.add(0, 1 << 20, H)
    base = 128
    book.box.mm[base + 30] ^= 0xFF  # corrupt the handle behind the crc's back
    assert grants.state(0) == (None, False)
    assert grants.pick(10) is None


def test_attach_rejects_another_layout(tmp_path):
    path = tmp_path / "zmqdisagg-1-mbx-0-0"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ProtocolMismatch):
        Mailbox.attach(str(path))


def test_grant_release_cycle(pair):
    grants, book = pair
    assert grants.pick(100) is None  # nothing published yet: the server packs
    g0 = book.add(0, 1 << 20, H)
    g1 = book.add(1, 1 << 20, H)
    p = grants.pick(100)
    assert p.kind == PUSH and p.r == 0
    q = grants.pick(100)
    assert q.kind == PUSH and q.r == 1
    assert grants.pick(100) is None  # both granted, neither released: never reused
    book.granted(0, g0)
    book.granted(1, g1)
    with pytest.raises(ProtocolMismatch):
        book.granted(0, g0)  # a second grant of the same offer is a protocol error
    assert book.offer(0, g0) and not book.offer(0, g0)  # released once, a double release is a no-op
    assert grants.pick(100).r == 0
    assert grants.pick(100) is None


def test_smallest_fitting_slot_wins_and_big_replies_miss(pair):
    grants, book = pair
    book.add(0, 8 << 20, H)
    book.add(1, 1 << 20, H)
    assert grants.pick(1000).r == 1
    assert grants.pick(1000).r == 0
    book.add(2, 1 << 20, H)
    assert grants.pick(2 << 20) is None  # free but too small, and not every slot is published


def test_retire_hands_a_small_slot_back_when_all_are_published(pair):
    grants, book = pair
    gens = [book.add(r, (1 << 20) << r, H) for r in range(4)]
    p = grants.pick(64 << 20)
    assert p.kind == RETIRE and p.r == 0  # the smallest free one
    book.granted(0, gens[0])
    book.forget(0)
    g = book.add(0, 64 << 20, H)  # regrown under a new generation
    p2 = grants.pick(64 << 20)
    assert p2.kind == PUSH and p2.r == 0 and p2.desc.gen == g and p2.desc.size == 64 << 20


def test_client_cannot_replace_an_offered_slot(pair):
    _, book = pair
    book.add(0, 1 << 20, H)
    with pytest.raises(ProtocolMismatch):
        book.add(0, 2 << 20, H)
    with pytest.raises(ProtocolMismatch):
        book.forget(0)


def test_wrong_generation_is_refused(pair):
    grants, book = pair
    g = book.add(0, 1 << 20, H)
    grants.pick(10)
    with pytest.raises(ProtocolMismatch):
        book.granted(0, g + 1)
    with pytest.raises(ProtocolMismatch):
        book.granted(3, 1)  # never published


def test_counters_wrap(pair):
    grants, book = pair
    g = book.add(0, 1 << 20, H)
    rec = book.recs[0]
    rec.offers = rec.received = MASK  # about to wrap
    grants.state(0)
    grants.grants[0] = MASK
    assert grants.pick(10) is None
    assert book.offer(0, g)  # offers = 2**32: the stored word wraps to 0
    assert book.box.word(0) == (g, 0)
    assert grants.pick(10).r == 0


def test_counts_and_unused(pair):
    grants, book = pair
    assert book.unused() == 0
    book.add(0, 1 << 20, H)
    book.add(1, 4 << 20, H)
    assert book.unused() == 2 and book.fitting(2 << 20) == 1
    assert grants.free_count() == 2 and book.offered() == [0, 1]
    p = grants.pick(1)
    grants.ungrant(p.r)  # a reply that was never sent gives its grant back
    assert grants.free_count() == 2


def _client_proc(path: str, rounds: int) -> None:
    box = Mailbox.attach(path)
    book = ClientBook(box)
    gen = book.add(0, 1 << 20, H)
    for _ in range(rounds):  # wait for each grant (the server bumps a side counter), then release
        while box.words[12] != book.recs[0].received + 1:
            pass
        book.granted(0, gen)
        book.offer(0, gen)
    box.close()


def test_two_processes_never_double_grant(tmp_path):
    """A real second process releases; the server must see each release exactly once."""
    server = Mailbox.create(str(tmp_path), 1)
    grants = ServerGrants(server)
    rounds = 300
    proc = mp.get_context("spawn").Process(target=_client_proc, args=(server.path, rounds))
    proc.start()
    got = 0
    try:
        while got < rounds:
            p = grants.pick(10)
            if p is None:
                assert proc.is_alive() or got == rounds
                continue
            got += 1
            assert grants.pick(10) is None  # granted: never free again before the client releases
            server.words[12] = got  # test-only side channel (reserved header bytes 96..104): "reply sent"
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        server.close(unlink=True)
