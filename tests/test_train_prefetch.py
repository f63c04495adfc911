"""Prefetcher over the real tiny target: order, depth in flight, drained boundaries, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from zmqdisagg.errors import BadRequest, ConfigError
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch
from zmqdisagg.train.prefetch import Prefetcher


class Recording:
    """The real TargetModel, with a log of when each request started and how many ran at once."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.started: list[int] = []
        self.running = self.most_running = 0

    def eagle3(self, batch: TargetBatch) -> dict[str, torch.Tensor]:
        with self.lock:
            self.started.append(int(batch.input_ids[0, 0]))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            return self.inner.eagle3(batch)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture(scope="module")
def model():
    target = load_target("configs/tiny-llama.json")
    yield target
    target.close()


def _batches(n: int, vocab: int = 320) -> list[TargetBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (2, 48), generator=g)
        ids[0, 0] = i  # tags the request
        out.append(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
    return out


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_results_in_order_and_at_most_depth_requests_ahead(model, depth):
    target, batches = Recording(model), _batches(8)
    expected = [model.eagle3(b) for b in batches]
    with Prefetcher(target, "eagle3", depth) as pf:
        for k, (out, wait) in enumerate(pf.run(batches)):
            with target.lock:
                ahead = len(target.started) - (k + 1)
            assert ahead <= depth, f"{ahead} requests started beyond the one consumed"
            assert wait >= 0 and all(torch.equal(out[name], expected[k][name]) for name in expected[k])
    assert sorted(target.started) == list(range(8)) and target.running == 0
    assert target.most_running <= max(depth, 1)


def test_a_run_is_drained_when_it_ends_or_stops_early(model):
    target = Recording(model)
    with Prefetcher(target, "eagle3", 3) as pf:
        assert len(list(pf.run(_batches(2)))) == 2
        assert target.running == 0 and len(target.started) == 2  # nothing prefetched past the segment
        results = pf.run(_batches(10))
        next(results)
        results.close()  # the consumer stops (a checkpoint boundary, an exception)
        assert target.running == 0 and len(target.started) <= 2 + 3


def test_a_failed_request_raises_in_order_and_cancels_the_rest(model):
    batches = _batches(6)
    bad = batches[2].input_ids.clone()
    bad[1, 5] = 10_000  # outside the vocab: the target refuses it
    batches[2] = TargetBatch(input_ids=bad, attention_mask=batches[2].attention_mask)
    target = Recording(model)
    got = []
    with Prefetcher(target, "eagle3", 2) as pf, pytest.raises(BadRequest):
        for out, _ in pf.run(batches):
            got.append(out)
    assert len(got) == 2 and target.running == 0 and len(target.started) <= 5


def test_closed_or_negative_depth_is_refused(model):
    with pytest.raises(ConfigError, match="prefetch_depth"):
        Prefetcher(model, "eagle3", -1)
    pf = Prefetcher(model, "eagle3", 2)
    pf.close()
    pf.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(pf.run(_batches(1)))
