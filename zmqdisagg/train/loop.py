"""``Trainer``: the draft-training loop for every algorithm, the same whether the target is local or remote.

One optimizer step ``s``:

    global batch(s) --shard--> this rank's micro-batches --Prefetcher--> target.<algo.op> (local or remote)
        for each micro-batch: algo.inputs -> objective forward (loss, stats) -> backward (DDP no_sync but last)
    clip -> AdamW(lr_at(s)) -> all-reduced stats -> algo.metrics -> metrics.jsonl / TensorBoard / tqdm

What differs between EAGLE3 and DFlash (the target op, the draft, the loss, the metrics, the export) is
behind the ``Algorithm`` interface (``algorithm.py``); everything here serves both.

Steps run in *segments* that end at every eval, checkpoint and the last step; a segment is one
``Prefetcher.run``, so no target request is ever in flight across those boundaries.

Guarantees:
  * the losses depend only on the config, the data and the target's outputs: not on where the target
    runs, how many servers there are, the prefetch depth, or whether the run was resumed (the batch of
    step ``s`` is a function of ``(seed, s)``, the learning rate a function of ``s``, and the checkpoint
    restores weights, optimizer and RNG bit for bit);
  * with W ranks the global batch means what it means in one process (see ``distributed.py``);
  * ``close()`` is idempotent and releases the target, spawned servers, metrics files and the group.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import torch

from zmqdisagg.target.build import load_tokenizer
from zmqdisagg.target.types import TargetBatch, TargetSettings
from zmqdisagg.train import checkpoint, distributed
from zmqdisagg.train.algorithm import EVAL_SALT, Setup, build_algorithm
from zmqdisagg.train.batching import BatchPlan, collate, eval_micro_batches, split_indices
from zmqdisagg.train.config import TrainConfig
from zmqdisagg.train.data import load_dataset
from zmqdisagg.train.demo_data import write_demo_jsonl
from zmqdisagg.train.demo_target import train_demo_target
from zmqdisagg.train.metrics import MetricsLog
from zmqdisagg.train.optim import build_optimizer, clip_grad, lr_at, set_lr
from zmqdisagg.train.prefetch import Prefetcher
from zmqdisagg.train.target_setup import open_target

logger = logging.getLogger(__name__)

# Slots of the float64 vector each step sums over micro-batches and all-reduces over ranks.
_LOSS, _WAIT, _BYTES, _STATS = 0, 1, 2, 3  # loss, seconds waited on the target, bytes it returned, stats...


class Trainer:
    """Build with a ``TrainConfig``, call ``run()``, always ``close()``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._stack = contextlib.ExitStack()
        self._closed = False
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = distributed.init_distributed("cuda" if cuda else "cpu")
        self._stack.callback(distributed.close, self.dist)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if cuda else "cpu")
        self._sync_timing = cfg.sync_timing and cuda
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.micro_size = cfg.micro_batch_size(dist.world_size)
        if dist.is_main:
            self._prepare_demo()
        distributed.barrier(dist)
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._load_data()
        self.target = open_target(cfg, self.device, self._stack)
        self.info = self.target.info()
        setup = Setup(cfg=cfg, info=self.info, tokenizer=self.tokenizer, ds=self.ds, train_idx=self.train_idx,
                      data_key=self.data_key, device=self.device)
        self.algo = self._rank0_first(lambda: build_algorithm(setup))  # rank 0 fills caches (EAGLE3 vocab)
        self.settings: TargetSettings = self.target.configure(*self.algo.target_settings())
        self._build_draft()
        self.prefetcher = Prefetcher(self.target, self.algo.op, cfg.prefetch_depth)
        self._stack.callback(self.prefetcher.close)
        self.start_step = self._maybe_resume()
        self.metrics = MetricsLog(cfg.output_dir, enabled=dist.is_main, total_steps=cfg.max_steps,
                                  start_step=self.start_step, tensorboard=cfg.tensorboard, progress=cfg.progress,
                                  headline=self.algo.headline)
        self._stack.callback(self.metrics.close)

    def _rank0_first(self, fn: Any) -> Any:
        """Run ``fn`` on rank 0, then on the others (which then hit rank 0's cache)."""
        if self.dist.is_main:
            out = fn()
        distributed.barrier(self.dist)
        return out if self.dist.is_main else fn()

    def _prepare_demo(self) -> None:
        """Write the demo dialogues and train the demo target, if the config asks and they are missing."""
        cfg = self.cfg
        if cfg.demo_samples and not Path(cfg.data_path).exists():
            write_demo_jsonl(cfg.data_path, cfg.demo_samples, cfg.demo_seed)
        if cfg.demo_target_steps and not Path(cfg.model).exists():
            logger.info("training the demo target %s (%d steps, once)", cfg.model, cfg.demo_target_steps)
            train_demo_target(cfg.model, data_path=cfg.data_path, cache_dir=cfg.resolved_cache_dir,
                              steps=cfg.demo_target_steps, max_length=cfg.max_length, seed=cfg.demo_seed)

    def _load_data(self) -> None:
        cfg = self.cfg
        self.ds, self.data_key = self._rank0_first(
            lambda: load_dataset(cfg.data_path, self.tokenizer, cfg.max_length, cfg.resolved_cache_dir))
        self.train_idx, self.eval_idx = (split_indices(len(self.ds), cfg.eval_samples, cfg.seed)
                                         if cfg.eval_samples else (list(range(len(self.ds))), []))
        self.plan = BatchPlan(indices=tuple(self.train_idx), batch_size=cfg.batch_size, seed=cfg.seed)
        logger.info("data: %d train / %d eval sequences, %d steps per epoch", len(self.train_idx),
                    len(self.eval_idx), self.plan.steps_per_epoch)

    def _build_draft(self) -> None:
        head = self.target.head_weights()
        torch.manual_seed(self.cfg.seed)  # the draft's initial weights are a function of the seed
        self.draft, self.objective = self.algo.build(self.settings, head)
        self.model = distributed.wrap(self.objective, self.dist)
        self.optimizer = build_optimizer(self.draft.parameters(), self.cfg)

    def _maybe_resume(self) -> int:
        if not self.cfg.resume:
            return 0
        path = checkpoint.latest(self.cfg.output_dir)
        if path is None:
            logger.warning("--resume: no checkpoint under %s; starting from step 0", self.cfg.output_dir)
            return 0
        return checkpoint.load(path, draft=self.draft, optimizer=self.optimizer)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``max_steps``; return the last train record (and eval record, if any)."""
        cfg, step = self.cfg, self.start_step
        summary: dict[str, Any] = {}
        while step < cfg.max_steps:
            end = self._next_boundary(step)
            summary["train"] = self._train_segment(step, end) or summary.get("train")
            step = end
            if self.eval_idx and (step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                summary["eval"] = self.evaluate(step)
            if cfg.checkpoints and (step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0)):
                self._save(step)
        if cfg.export and self.dist.is_main:
            summary["export"] = str(self.algo.export(Path(cfg.output_dir) / "export"))
        return summary

    def _next_boundary(self, step: int) -> int:
        cfg = self.cfg
        ends = [cfg.max_steps] + [(step // n + 1) * n for n in (cfg.eval_every, cfg.save_every) if n]
        return min(ends)

    def _requests(self, steps: range, queue: deque) -> Iterator[TargetBatch]:
        """This rank's micro-batches of ``steps`` as target requests; the collated batches go to ``queue``."""
        for s in steps:
            for indices in self.plan.rank_micro_batches(s, self.dist.rank, self.dist.world_size,
                                                        self.cfg.micro_batches):
                batch = collate(self.ds, indices, self.pad_id)
                queue.append(batch)
                yield TargetBatch(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def _train_segment(self, start: int, end: int) -> dict[str, Any] | None:
        queue: deque = deque()
        results = self.prefetcher.run(self._requests(range(start, end), queue))
        record = None
        try:
            for step in range(start, end):
                record = self._train_step(step, results, queue)
                self.metrics.write(record)
        finally:
            results.close()
        return record

    def _train_step(self, step: int, results: Iterator, queue: deque) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        global_batch = self.plan.global_batch(step)
        tokens = self.ds.token_counts(global_batch)[0]
        denom = max(self.algo.denominator(global_batch, step), 1.0)
        sums = torch.zeros(_STATS + 3 * self.algo.stat_rows, dtype=torch.float64, device=self.device)
        wait, nbytes = 0.0, 0
        for m in range(cfg.micro_batches):
            outputs, waited = self._next_result(results)
            wait += waited
            nbytes += sum(t.numel() * t.element_size() for t in outputs.values())
            sync = m == cfg.micro_batches - 1
            with self._no_sync(not sync):
                loss, stats = self._forward(queue.popleft(), outputs, denom, step)
                loss.backward()
            sums[_LOSS] += loss.detach().double()
            sums[_STATS:] += stats.flatten()
        grad_norm = clip_grad(self.draft.parameters(), cfg.grad_clip)
        set_lr(self.optimizer, lr_at(step, cfg))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums[_WAIT], sums[_BYTES] = wait, nbytes
        distributed.all_reduce_sum(sums, self.dist)
        if self._sync_timing:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": step + 1, "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                  **self._step_metrics(sums, denom),
                  "target_wait_ms": 1000 * float(sums[_WAIT]) / self.dist.world_size,
                  "train_ms": 1000 * (elapsed - wait), "step_ms": 1000 * elapsed,
                  "target_bytes": int(sums[_BYTES]), "tokens_per_s": tokens / max(elapsed, 1e-9)}
        return record

    def _next_result(self, results: Iterator) -> tuple[dict[str, torch.Tensor], float]:
        """The next target result and the seconds spent waiting for it.

        With ``sync_timing`` on CUDA the device is synchronised before and after: the draft's queued
        kernels then count as training, and a co-located target's kernels (launched, not yet run, when
        its call returns) count as waiting. Costs a little overlap; meant for benchmarks.
        """
        if not self._sync_timing:
            return next(results)
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        outputs, _ = next(results)
        torch.cuda.synchronize(self.device)
        return outputs, time.perf_counter() - t0

    def _forward(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], denom: float,
                 salt: int, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.algo.inputs(batch, outputs, salt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return (model or self.model)(**inputs, denom=float(denom))

    def _no_sync(self, skip: bool) -> Any:
        return self.model.no_sync() if skip and self.dist.world_size > 1 else contextlib.nullcontext()

    def _step_metrics(self, sums: torch.Tensor, denom: float) -> dict[str, float]:
        stats = sums[_STATS:].view(self.algo.stat_rows, 3).cpu()
        return {"loss": float(sums[_LOSS]), **self.algo.metrics(stats, denom)}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Loss and accuracies on the held-out split (every rank scores its share)."""
        batches = eval_micro_batches(self.eval_idx, self.micro_size, self.dist.rank, self.dist.world_size)
        collated = [collate(self.ds, b, self.pad_id) for b in batches]
        requests = (TargetBatch(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in collated)
        denom = max(self.algo.denominator(self.eval_idx, EVAL_SALT), 1.0)
        sums = torch.zeros(_STATS + 3 * self.algo.stat_rows, dtype=torch.float64, device=self.device)
        for i, (outputs, _) in enumerate(self.prefetcher.run(requests)):
            loss, stats = self._forward(collated[i], outputs, denom, EVAL_SALT, self.objective)
            sums[_LOSS] += loss.double()
            sums[_STATS:] += stats.flatten()
        distributed.all_reduce_sum(sums, self.dist)
        record = {"kind": "eval", "step": step, **self._step_metrics(sums, denom)}
        self.metrics.write(record)
        return record

    def _save(self, step: int) -> None:
        if self.dist.is_main:
            checkpoint.save(self.cfg.output_dir, step, draft=self.draft, optimizer=self.optimizer,
                            config=self.cfg.to_dict())
        distributed.barrier(self.dist)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stack.close()
