"""One trainer process of ``bench/train_speed.py``: run a list of jobs, each a ``Trainer`` with its config.

    python bench/_speed_worker.py JOBS.json          (RANK/WORLD_SIZE/MASTER_* set for data parallelism)

``JOBS.json`` is a list of ``{"name", "dir", "config"}``; ``config`` is a ``TrainConfig`` dict. The jobs
run back to back in this process, so imports, the CUDA context and the process group are paid once.
This process owns the process group (made before the first ``Trainer``, which then leaves it alone), so
consecutive trainers share it.

Per job, rank 0 writes ``DIR/started.json`` when it begins and ``DIR/result.json`` when it ends
(transports by server, device name, build and run seconds, or the error); the orchestrator watches those
files for its deadlines. The first failing job ends the process with exit code 1, because a rank that
failed may leave its peers inside a collective; the orchestrator restarts the remaining jobs.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from zmqdisagg.log import init_cli_logging  # noqa: E402
from zmqdisagg.train.config import TrainConfig  # noqa: E402
from zmqdisagg.train.loop import Trainer  # noqa: E402

logger = logging.getLogger("zmqdisagg.bench.worker")


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # the orchestrator never reads half a file


def join_group(device: str, timeout_s: float) -> int:
    """Join the group described by the environment (as torchrun would set it); return this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank()


def run_job(job: dict[str, Any], rank: int) -> None:
    cfg = TrainConfig.from_dict(job["config"])
    out = Path(job["dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "started.json", {"at": time.time(), "pid": os.getpid()})
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        built = time.perf_counter() - t0
        transports = dict(getattr(trainer.target, "transports", {}))  # RemoteTarget: the handshake's choice
        trainer.run()
    finally:
        trainer.close()
    record = {"ok": True, "transports": transports, "build_s": round(built, 2),
              "run_s": round(time.perf_counter() - t0 - built, 2), "device": str(trainer.device),
              "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
              "world_size": trainer.dist.world_size,
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rank == 0:
        _write(out / "result.json", record)


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    init_cli_logging("bench", rank)
    device = jobs[0]["config"].get("device", "cpu")
    rank = join_group(device, float(os.environ.get("ZMQDISAGG_BENCH_TIMEOUT_S", "600")))
    for job in jobs:
        logger.info("job %s starts", job["name"])
        try:
            run_job(job, rank)
        except BaseException as e:  # noqa: BLE001 - recorded for the report, then this process ends
            logger.error("job %s failed:\n%s", job["name"], traceback.format_exc())
            if rank == 0:
                _write(Path(job["dir"]) / "result.json", {"ok": False, "error": f"{type(e).__name__}: {e}"})
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # peers may be stuck in a collective: no clean shutdown to wait for
        logger.info("job %s done", job["name"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
