"""Checkpoints that let ``--resume`` continue exactly where a run stopped.

Layout: ``<output_dir>/checkpoints/step_00000050/state.pt`` holds

    step       completed optimizer steps (also the data position: batches are a function of the step)
    draft      the draft's state_dict (trainable weights + d2t/t2d; not the frozen target embedding)
    optimizer  AdamW state (moments, step counts), bit-exact
    rng        torch CPU/CUDA and Python ``random`` generator states
    config     the TrainConfig as a dict (for the record; the resumed run's own config is used)

Guarantees: a checkpoint directory appears only complete (written to ``.tmp`` and renamed); only rank 0
writes; ``latest`` ignores incomplete directories. The learning rate needs no state (``optim.lr_at``).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str | Path, step: int, *, draft: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: dict[str, Any]) -> Path:
    """Write the checkpoint of ``step`` atomically and return its directory."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng_state(), "config": config}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    logger.info("saved checkpoint %s", final)
    return final


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / STATE_FILE).exists())
    return done[-1] if done else None


def load(path: str | Path, *, draft: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore draft, optimizer and RNG from ``path``; return the step to continue from."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    draft.load_state_dict(state["draft"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
