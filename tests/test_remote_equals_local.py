"""Remote results equal local ones bit for bit, over every host transport, tcp:// and ipc://."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch, TargetSettings

CONFIGS = ["configs/tiny-llama.json", "configs/tiny-qwen3.json"]


def _batch(vocab: int, seed: int, b: int = 3, s: int = 24) -> TargetBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, s // 2:] = 0  # a right-padded row
    return TargetBatch(input_ids=ids, attention_mask=mask)


def _t2d(vocab: int) -> torch.Tensor:
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[::3] = True
    return t2d


def _assert_same(remote: dict, local: dict) -> None:
    assert remote.keys() == local.keys()
    for k in local:
        assert remote[k].dtype == local[k].dtype and remote[k].shape == local[k].shape, k
        assert torch.equal(remote[k], local[k]), f"{k} differs between remote and local"


@pytest.fixture(scope="module", params=CONFIGS)
def local_and_config(request):
    model = load_target(request.param)
    yield request.param, model
    model.close()


@pytest.mark.parametrize("endpoint", ["tcp", "ipc"])
def test_remote_equals_local_bitwise(local_and_config, endpoint, tmp_path):
    config, local = local_and_config
    bind = "tcp://127.0.0.1:*" if endpoint == "tcp" else f"ipc://{tmp_path}/serve.sock"
    with spawn_server(config, bind=bind) as srv:
        for transport in ("inline", "shm", "nccl"):  # nccl runs over gloo for CPU tensors
            with RemoteTarget([srv.address], ClientConfig(transport=transport)) as remote:
                assert remote.transports[srv.address] == transport
                vocab = remote.info().vocab_size
                assert remote.info() == local.info()
                settings = TargetSettings(aux_layer_ids=(1, 3, 5), dflash_layer_ids=(2, 4))
                assert remote.configure(settings, _t2d(vocab)) == local.configure(settings, _t2d(vocab))
                for seed in range(2):
                    batch = _batch(vocab, seed)
                    _assert_same(remote.eagle3(batch), local.eagle3(batch))
                    _assert_same(remote.dflash(batch), local.dflash(batch))
                _assert_same(remote.head_weights(), local.head_weights())
                for teacher in ("target_p_fp32", "target_p_bf16"):
                    s = TargetSettings(teacher=teacher)
                    remote.configure(s, _t2d(vocab)), local.configure(s, _t2d(vocab))
                    _assert_same(remote.eagle3(_batch(vocab, 5)), local.eagle3(_batch(vocab, 5)))
    if endpoint == "ipc":
        assert not os.path.exists(f"{tmp_path}/serve.sock"), "server left its ipc socket file"


def _settings(seed: int) -> TargetSettings:
    # different layer settings per client: a shared-state bug on the server would mix them up
    return TargetSettings(aux_layer_ids=(seed % 3, 4, 6), dflash_layer_ids=(seed % 5,))


def test_two_clients_concurrently_get_their_own_results():
    # References are computed up front in this thread: CPU kernels called from several threads at
    # once may pick other thread counts, and so other summation orders, than a lone caller.
    local = load_target(CONFIGS[0])
    vocab = local.info().vocab_size
    plans = {seed: [_batch(vocab, seed * 100 + i, b=2, s=16 + i) for i in range(6)] for seed in (1, 2, 3)}
    want = {}
    for seed, batches in plans.items():
        local.configure(_settings(seed), None)
        want[seed] = [(local.eagle3(b), local.dflash(b)) for b in batches]
    errors: list[BaseException] = []

    def client(seed: int, transport: str, address: str) -> None:
        try:
            with RemoteTarget([address], ClientConfig(transport=transport)) as remote:
                remote.configure(_settings(seed), None)
                for batch, (e3, df) in zip(plans[seed], want[seed]):
                    _assert_same(remote.eagle3(batch), e3)
                    _assert_same(remote.dflash(batch), df)
        except BaseException as e:  # surfaced by the main thread below
            errors.append(e)

    with spawn_server(CONFIGS[0]) as srv:
        threads = [threading.Thread(target=client, args=(seed, tr, srv.address))
                   for seed, tr in ((1, "shm"), (2, "inline"), (3, "shm"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors


def test_concurrent_lanes_of_one_client_stay_in_order():
    """Overlapping calls from several threads of one RemoteTarget each get their own batch's result."""
    local = load_target(CONFIGS[0])
    vocab = local.info().vocab_size
    batches = [_batch(vocab, 1000 + i, b=1, s=8 + i) for i in range(12)]
    want = [local.eagle3(b) for b in batches]
    got: dict[int, dict] = {}
    with spawn_server(CONFIGS[0]) as srv, RemoteTarget([srv.address], ClientConfig(transport="shm", max_lanes=3)) as remote:
        def work(i: int) -> None:
            got[i] = remote.eagle3(batches[i])
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = remote.stats()[srv.address]
    for i, w in enumerate(want):
        _assert_same(got[i], w)
    assert stats["you"]["transport"] == "shm"
