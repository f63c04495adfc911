"""Where training numbers go: ``metrics.jsonl``, TensorBoard and a tqdm bar, all on rank 0 only.

``metrics.jsonl`` has one JSON object per line; ``kind`` is ``train`` (one per optimizer step) or
``eval``. Train records carry ``step`` (1-based, completed steps), ``loss``, the algorithm's metrics
(EAGLE3: ``loss_i``/``acc_i`` per TTT step; DFlash: ``loss_k``/``acc_k`` per block position and
``accept_len``), ``lr``, ``grad_norm``, ``target_wait_ms``, ``train_ms``, ``step_ms``, ``target_bytes`` (bytes
of target outputs the step consumed, summed over ranks) and ``tokens_per_s``. Floats are
written with Python's ``repr``, so two runs' losses compare bit for bit by reading the file.

Guarantees: on resume from step ``k`` the records after ``k`` are dropped first, so a resumed run's file
equals an uninterrupted run's; TensorBoard is optional (skipped with a warning when not installed);
``close()`` is idempotent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


class MetricsLog:
    """Rank 0's sink for per-step records; other ranks get a log with ``enabled=False``."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, headline: tuple[str, ...] = ("acc_0",)) -> None:
        self.enabled = enabled
        self.headline = headline  # metric keys shown next to the loss (bar and eval log line)
        self._tb = self._bar = self._file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(out / METRICS_FILE, start_step)
        self._file = (out / METRICS_FILE).open("a")
        if tensorboard:
            self._tb = _summary_writer(out / "tensorboard")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    @staticmethod
    def _truncate(path: Path, start_step: int) -> None:
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._bar is not None and record["kind"] == "train":
            shown = {k: f"{record[k]:.3f}" for k in self.headline}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", **shown, tok_s=f"{record['tokens_per_s']:.0f}",
                                  refresh=False)
            self._bar.update(1)
        elif record["kind"] == "eval":
            logger.info("eval at step %d: loss %.4f %s", record["step"], record["loss"],
                        headline_text(record, self.headline))

    def close(self) -> None:
        for name in ("_bar", "_tb", "_file"):
            handle = getattr(self, name)
            setattr(self, name, None)
            if handle is not None:
                handle.close()


def headline_text(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    """``"acc_0 0.871"``-style text of ``keys`` in ``record``."""
    return " ".join(f"{k} {record[k]:.3f}" for k in keys)


def _summary_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed; writing metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))
