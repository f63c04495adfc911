"""Layouts, GPU placement and the per-job ``TrainConfig`` of ``bench/train_speed.py``.

A *layout* says where the target and the draft trainers run::

    colocated:dp=K                                  K trainer ranks, each with its own in-process target
    remote:servers=S,trainers=K,depth=D,server_tp=P S zmqdisagg-serve processes (P GPUs each) feeding
                                                    K trainer ranks that keep D requests in flight

Placement on ``G`` GPUs (logical ids 0..G-1, mapped through the caller's ``CUDA_VISIBLE_DEVICES``):
trainers take the lowest ids, server ``i`` takes ``[G-(i+1)P, G-iP)``. A server is therefore the same
process for every layout that names it (same index, same TP), so servers are started once and shared.
A trainer sees its own GPUs first and the servers' after them, so CUDA IPC can open the servers' slots.

Every layout of one run trains on the same global batch (``batch_size`` sequences of ``seq_len``
tokens, one sequence per micro-batch), so losses compare across layouts and iteration times are
times of the same work.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmqdisagg.errors import ConfigError

KINDS = ("colocated", "remote")
_KEYS = {"colocated": {"dp": "trainers"},
         "remote": {"servers": "servers", "trainers": "trainers", "depth": "depth", "server_tp": "server_tp"}}
DEFAULT_LAYOUTS = ("colocated:dp=1", "colocated:dp=2", "colocated:dp=3",
                   "remote:servers=1,trainers=1,depth=0", "remote:servers=1,trainers=1,depth=1",
                   "remote:servers=1,trainers=1,depth=2", "remote:servers=2,trainers=1,depth=2",
                   "remote:servers=1,trainers=2,depth=2")


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    kind: str
    trainers: int = 1
    servers: int = 0
    depth: int = 0
    server_tp: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"layout kind {self.kind!r} must be one of {KINDS}")
        if self.trainers < 1 or self.depth < 0 or self.server_tp < 1:
            raise ConfigError(f"layout {self.name}: trainers/dp and server_tp must be >= 1, depth >= 0")
        if self.kind == "remote" and self.servers < 1:
            raise ConfigError(f"layout {self.name}: a remote layout needs servers >= 1")

    @property
    def name(self) -> str:
        if self.kind == "colocated":
            return f"colocated:dp={self.trainers}"
        return (f"remote:servers={self.servers},trainers={self.trainers},depth={self.depth}"
                + (f",server_tp={self.server_tp}" if self.server_tp > 1 else ""))

    @property
    def gpus(self) -> int:
        """GPUs the layout occupies: trainers plus every server's tensor-parallel ranks."""
        return self.trainers + self.servers * self.server_tp

    def server_keys(self) -> tuple[tuple[int, int], ...]:
        """``(index, tp)`` of each server: the identity under which the pool shares it."""
        return tuple((i, self.server_tp) for i in range(self.servers))


def parse_layout(text: str) -> Layout:
    """``colocated:dp=3`` or ``remote:servers=2,trainers=1,depth=2,server_tp=1`` -> ``Layout``."""
    kind, _, rest = text.strip().partition(":")
    if kind not in _KEYS:
        raise ConfigError(f"layout {text!r} must start with 'colocated:' or 'remote:' (e.g. colocated:dp=2, "
                          "remote:servers=1,trainers=2,depth=2)")
    values: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _KEYS[kind] or not value.strip().isdigit():
            raise ConfigError(f"layout {text!r}: {item!r} must be KEY=INT with KEY one of {sorted(_KEYS[kind])}")
        values[_KEYS[kind][key.strip()]] = int(value)
    return Layout(kind=kind, **values)


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """Logical GPU ids of a layout's trainer ranks and of each of its servers (empty on CPU)."""

    trainer_gpus: tuple[int, ...] = ()
    server_gpus: tuple[tuple[int, ...], ...] = ()


def server_gpus(key: tuple[int, int], gpus: int) -> tuple[int, ...]:
    index, tp = key
    return tuple(range(gpus - (index + 1) * tp, gpus - index * tp))


def place(layout: Layout, gpus: int) -> Placement:
    """Trainers on the lowest GPU ids, servers on the highest; ``ConfigError`` if they do not fit."""
    if gpus == 0:
        return Placement()
    if layout.gpus > gpus:
        raise ConfigError(f"layout {layout.name} needs {layout.gpus} GPUs but --gpus is {gpus}; drop it from "
                          "--layouts or raise --gpus")
    return Placement(trainer_gpus=tuple(range(layout.trainers)),
                     server_gpus=tuple(server_gpus(k, gpus) for k in layout.server_keys()))


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """What every layout trains: the target, the data shape, the steps and each algorithm's draft."""

    model: str
    device: str  # cuda or cpu
    target_dtype: str
    seq_len: int
    batch_size: int  # global sequences per step; 0 -> lcm of the layouts' trainer counts
    steps: int  # measured steps
    warmup: int  # steps run before them, not measured
    num_threads: int  # torch threads per trainer process (CPU bitwise equality needs 1 everywhere)
    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)  # algorithm -> TrainConfig keys

    def __post_init__(self) -> None:
        if self.seq_len < 8 or self.steps < 1 or self.warmup < 0:
            raise ConfigError("--seq must be >= 8, --steps >= 1 and --warmup >= 0")

    def global_batch(self, layouts: list[Layout]) -> int:
        return self.batch_size or math.lcm(*(layout.trainers for layout in layouts))


def train_config(layout: Layout, algorithm: str, work: Workload, *, batch: int, out_dir: Path, data: Path,
                 cache: Path, servers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``TrainConfig`` keys of one (layout, algorithm) job."""
    if batch % layout.trainers:
        raise ConfigError(f"batch {batch} does not split over {layout.trainers} trainers; pass --batch as a "
                          "multiple of every trainer count")
    remote = layout.kind == "remote"
    return {**work.drafts[algorithm], "algorithm": algorithm, "model": work.model, "target_dtype": work.target_dtype,
            "target": "remote" if remote else "local", "servers": list(servers),
            "prefetch_depth": layout.depth if remote else 0, "data_path": str(data), "cache_dir": str(cache),
            "output_dir": str(out_dir), "max_length": work.seq_len, "batch_size": batch,
            "micro_batches": batch // layout.trainers, "max_steps": work.warmup + work.steps, "eval_samples": 0,
            "warmup_steps": 1, "export": False, "checkpoints": False, "tensorboard": False, "progress": False,
            "device": work.device, "num_threads": work.num_threads, "sync_timing": True, "seed": 0}


def model_shape(model: str) -> dict[str, Any]:
    """``hidden_size``/``num_hidden_layers`` of a JSON model config (for the expected transfer bytes)."""
    from zmqdisagg.target.build import resolve_source

    source = resolve_source(model)
    return source.config if source.config is not None else json.loads((source.path / "config.json").read_text())


def expected_bytes(algorithm: str, work: Workload, batch: int) -> int:
    """Bytes of target outputs one step consumes (all ranks), from the configs alone.

    eagle3 (teacher=hidden): aux_hidden 3*H + last_hidden H per token, in the target dtype, plus a 1-byte
    position_mask; dflash: K*H per token, K = the draft's target layers.
    """
    hidden = model_shape(work.model)["hidden_size"]
    width = 2 if work.target_dtype in ("bfloat16", "float16") else 4
    tokens = batch * work.seq_len
    draft = work.drafts[algorithm]
    if algorithm == "eagle3":
        aux = len(draft.get("aux_layer_ids") or (0, 0, 0))
        return tokens * ((aux + 1) * hidden * width + 1)
    layers = len(draft.get("dflash_layer_ids") or range(draft.get("num_draft_layers", 1)))
    return tokens * layers * hidden * width


def write_data(path: Path, seq_len: int, samples: int, seed: int = 0) -> None:
    """Dialogues whose assistant turn runs past ``seq_len`` bytes: every sample truncates to ``seq_len``
    tokens (byte tokenizer), so each micro-batch is exactly one full-length sequence."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(512)]
    with path.open("w") as f:
        for _ in range(samples):
            text = ""
            while len(text) < seq_len + 64:
                text += rng.choice(words) + " "
            turns = [{"role": "user", "content": "continue:"}, {"role": "assistant", "content": text}]
            f.write(json.dumps({"conversations": turns}) + "\n")
