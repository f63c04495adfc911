"""A demo target worth imitating: the tiny bundled Llama, trained for a minute on the demo dialogues.

A random-init target is a poor teacher for a demo: its next-token distributions are almost uniform
(max p ~ 1/V), so a draft's loss cannot fall much below the teacher's entropy and most target argmaxes
fall outside the draft vocab. A few hundred causal-LM steps on the demo data give a target that predicts
its templated answers with p ~ 0.99, which a draft can then learn to imitate. This is a demo aid only:
real runs point ``model`` at a real model directory.

Guarantees: deterministic for the same arguments on the same machine (seeded, CPU, fp32, the caller's
RNG untouched); the output is an ordinary Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files with the chat template) that ``load_target``/``load_tokenizer`` and ``zmqdisagg-serve
--model DIR`` load; it appears atomically (written to ``DIR.tmp``, then renamed).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from zmqdisagg.target.build import load_target, load_tokenizer
from zmqdisagg.train.batching import BatchPlan, collate
from zmqdisagg.train.data import load_dataset

logger = logging.getLogger(__name__)

BASE = "configs/tiny-llama.json"


def train_demo_target(out_dir: str | Path, *, data_path: str | Path, cache_dir: str | Path, base: str = BASE,
                      steps: int = 300, batch_size: int = 16, max_length: int = 160, lr: float = 3e-3,
                      seed: int = 0) -> Path:
    """Train ``base`` with next-token loss on every token of ``data_path``; save it to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base)
    ds, _ = load_dataset(data_path, tokenizer, max_length, cache_dir)
    target = load_target(base, seed=seed)
    model = target.model.train().requires_grad_(True)
    plan = BatchPlan(indices=tuple(range(len(ds))), batch_size=batch_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20)  # 20 warmup steps, then constant
            batch = collate(ds, plan.global_batch(step), tokenizer.pad_token_id)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == steps - 1:
                logger.info("demo target step %d/%d: next-token loss %.3f", step + 1, steps, loss.item())
    _save(model.eval(), tokenizer, out_dir, {"base": base, "data_path": str(data_path), "steps": steps,
                                             "batch_size": batch_size, "max_length": max_length, "lr": lr,
                                             "seed": seed, "final_loss": loss.item()})
    target.close()
    return out_dir


def _save(model, tokenizer, out_dir: Path, record: dict) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "zmqdisagg_demo_target.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("saved the demo target to %s (final next-token loss %.3f)", out_dir, record["final_loss"])
