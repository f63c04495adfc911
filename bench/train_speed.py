"""Draft-training speed by layout: co-located vs disaggregated targets, for EAGLE3 and DFlash.

Usage (from the repository root)::

    python bench/train_speed.py --preset gpu-8b --out "$OUT" --work "$OUT/work"     # 4 GPUs, ~7 min
    python bench/train_speed.py --preset cpu-tiny --out /tmp/speed                  # CPU smoke, ~1 min
    python bench/train_speed.py --preset gpu-8b --gpus 8 --layouts colocated:dp=1 \\
        remote:servers=2,trainers=4,depth=2,server_tp=2 remote:servers=1,trainers=6,depth=2,server_tp=2

Layouts (``--layouts``, see ``bench/_speed_layouts.py``): ``colocated:dp=K`` runs K data-parallel
trainer ranks, each with its own in-process target (a tensor-parallel co-located target is not
supported); ``remote:servers=S,trainers=K,depth=D,server_tp=P`` runs S ``zmqdisagg-serve`` processes of
P GPUs each (``--tp P``) feeding K trainer ranks with prefetch depth D. ``colocated:dp=1`` is always run:
it is the reference that the ideal times come from. Trainers take the lowest GPUs, servers the highest;
servers are started once, in the background, and shared by every layout and both algorithms.

Every job is a real ``Trainer`` (``zmqdisagg/train/loop.py``) on the same global batch (``--batch``
sequences of ``--seq`` tokens, one sequence per micro-batch; default batch = lcm of the trainer counts),
with ``sync_timing`` so the wait/train split is exact on CUDA. For each (algorithm, layout) it reports
iteration time (mean, p50), tokens/s, tokens/s per GPU (server GPUs count), the fraction of time the
trainer waits on the target, bytes per step received from the target, the transport each connection
chose, and pipeline efficiency (``bench/_speed_report.py`` has the formulas). It also records every
step's loss and checks that layouts with the same trainer count give bitwise identical losses (across
trainer counts only the all-reduce order differs: max |dloss| is reported).

Outputs in ``--out``: ``STEM.json`` (rewritten after every job, so a cut-short run keeps its results),
``STEM_table.md`` and ``STEM.png``. Logs, job configs and metrics stay in ``--work``. A job that passes
``--job-timeout`` or dies is killed and reported; the run stops starting jobs after ``--time-budget``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench import _speed_report as report_mod  # noqa: E402
from bench._speed_layouts import (DEFAULT_LAYOUTS, Layout, Workload, expected_bytes, parse_layout,  # noqa: E402
                                  place, server_gpus, train_config, write_data)
from bench._speed_machine import describe_machine  # noqa: E402
from bench._speed_runner import Group, ServerPool, run_group  # noqa: E402
from zmqdisagg.errors import ConfigError, ZmqDisaggError  # noqa: E402
from zmqdisagg.log import init_cli_logging  # noqa: E402

logger = logging.getLogger("zmqdisagg.bench.train_speed")

# NVLink multicast stays off in every process this bench starts, unless the caller set these itself.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_LLAMA8B_DRAFT = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                  "rope_theta": 500000.0}
PRESETS: dict[str, dict[str, Any]] = {
    "gpu-8b": {"model": "configs/llama-3.1-8b-shape.json", "device": "cuda", "target_dtype": "bfloat16",
               "seq_len": 4096, "steps": 6, "warmup": 2, "num_threads": 8, "job_timeout": 240, "time_budget": 480,
               "drafts": {"eagle3": {**_LLAMA8B_DRAFT, "draft_vocab_size": 32000, "ttt_length": 7},
                          "dflash": {**_LLAMA8B_DRAFT, "block_size": 16, "num_anchors": 256,
                                     "num_draft_layers": 3}}},
    "cpu-tiny": {"model": "configs/tiny-llama.json", "device": "cpu", "target_dtype": "float32", "seq_len": 64,
                 "steps": 3, "warmup": 1, "num_threads": 1, "job_timeout": 90, "time_budget": 300,
                 "drafts": {"eagle3": {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
                                       "draft_vocab_size": 64, "ttt_length": 3},
                            "dflash": {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
                                       "block_size": 4, "num_anchors": 8, "num_draft_layers": 2}}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="gpu-8b: Llama-3.1-8B-shaped target (random init, bf16, built on the GPU), seq 4096, "
                        "Llama-8B-sized EAGLE3/DFlash drafts. cpu-tiny: configs/tiny-llama.json on CPU, seq 64, "
                        "gloo DP, 1 torch thread per process. Default: gpu-8b if CUDA is available, else cpu-tiny")
    p.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), metavar="LAYOUT",
                   help="layouts to run, e.g. colocated:dp=2 remote:servers=2,trainers=1,depth=2,server_tp=1 "
                        "(default: the 8 of issue #6)")
    p.add_argument("--algorithms", default="eagle3,dflash", help="comma-separated: eagle3, dflash")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to use (logical 0..N-1 of this process's CUDA_VISIBLE_DEVICES); default: all; "
                        "0 on CPU")
    p.add_argument("--model", help="target: a model config or HF directory (overrides the preset)")
    p.add_argument("--dtype", help="target dtype: bfloat16 or float32 (overrides the preset)")
    p.add_argument("--seq", type=int, help="tokens per sequence (2048-8192 on GPU; 8192 needs memory for "
                   "EAGLE3's 7 TTT steps of [32, S, S] attention)")
    p.add_argument("--batch", type=int, default=0, help="global sequences per step (0: lcm of trainer counts)")
    p.add_argument("--steps", type=int, help="measured steps per job")
    p.add_argument("--warmup", type=int, help="steps before the measured ones")
    p.add_argument("--threads", type=int, help="torch/OMP threads per process (CPU equality needs the same "
                   "count in servers and trainers)")
    p.add_argument("--job-timeout", type=float, help="seconds one job (build + steps) may take before it is killed")
    p.add_argument("--time-budget", type=float, help="seconds after which no further job starts and a "
                   "running one is killed")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    p.add_argument("--out", default="docs/benchmarks", help="directory for STEM.json, STEM_table.md, STEM.png")
    p.add_argument("--stem", default="train_speed", help="file name stem of the outputs")
    p.add_argument("--work", default=None, help="logs, job configs, metrics, data (default: a temp directory)")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> tuple[Workload, dict[str, Any]]:
    preset = PRESETS[args.preset]
    over = {"model": args.model, "target_dtype": args.dtype, "seq_len": args.seq, "steps": args.steps,
            "warmup": args.warmup, "num_threads": args.threads}
    keys = {k: v for k, v in preset.items() if k not in ("job_timeout", "time_budget")}
    keys.update({k: v for k, v in over.items() if v is not None})
    return Workload(**keys, batch_size=args.batch), preset


def plan_groups(layouts: list[Layout], algos: list[str], gpus: int) -> list[Group]:
    """Jobs grouped by trainer ranks; co-located groups that would stop a server run last."""
    server_gpu_set = {g for lay in layouts for s in place(lay, gpus).server_gpus for g in s}
    groups: dict[tuple[str, int], Group] = {}
    for lay in layouts:
        where = place(lay, gpus)
        group = groups.setdefault((lay.kind, lay.trainers), Group(world=lay.trainers, trainer_gpus=where.trainer_gpus,
                                                                  visible=where.trainer_gpus))
        extra = tuple(g for s in where.server_gpus for g in s if g not in group.visible)
        group.visible += tuple(sorted(extra))
        group.jobs += [{"algorithm": a, "layout": _fields(lay), "layout_name": lay.name, "gpus": lay.gpus}
                       for a in algos]

    def order(item: tuple[tuple[str, int], Group]) -> tuple[int, int]:
        (kind, k), group = item
        blocks = bool(set(group.trainer_gpus) & server_gpu_set)
        return (2 if blocks else 0) if kind == "colocated" else 1, k
    return [g for _, g in sorted(groups.items(), key=order)]


def _fields(lay: Layout) -> dict[str, Any]:
    return {"kind": lay.kind, "trainers": lay.trainers, "servers": lay.servers, "depth": lay.depth,
            "server_tp": lay.server_tp}


class Bench:
    """One run: the work directory, the server pool, the rows, and the report rewritten after every job."""

    def __init__(self, args: argparse.Namespace, work: Workload, layouts: list[Layout], gpus: int,
                 physical: list[str], root: Path) -> None:
        self.args, self.work, self.layouts, self.gpus, self.root = args, work, layouts, gpus, root
        self.batch = work.global_batch(layouts)
        self.algos = [a for a in args.algorithms.split(",") if a]
        self.rows: list[dict[str, Any]] = []
        cuda = work.device == "cuda"
        self.env = {"OMP_NUM_THREADS": str(work.num_threads or 1), "TOKENIZERS_PARALLELISM": "false",
                    **{k: os.environ.get(k, v) for k, v in NO_MULTICAST.items()}}
        # Trainers only: servers keep the default allocator, as a user's server would.
        self.trainer_env = {**self.env, "ZMQDISAGG_BENCH_TIMEOUT_S": str(int(args.job_timeout)),
                            **({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if cuda else {})}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.pool = ServerPool(model=work.model, extra=("--device", work.device, "--dtype", work.target_dtype,
                                                        "--seed", "0"), env=self.env,
                               gpus_of=lambda key: server_gpus(key, gpus) if gpus else (), physical=physical,
                               log_dir=root / "logs", timeout_s=args.server_timeout)
        self.physical = physical
        self.report: dict[str, Any] = {
            "command": "python " + shlex.join(sys.argv), "machine": describe_machine(work.device, gpus, physical),
            "workload": {k: getattr(work, k) for k in Workload.__slots__}, "batch": self.batch,
            "layouts": [lay.name for lay in layouts], "algorithms": self.algos, "rows": self.rows,
            "complete": False, "work_dir": str(root)}

    def run(self) -> None:
        data = self.root / "data.jsonl"
        write_data(data, self.work.seq_len, samples=4 * self.batch)
        groups = plan_groups(self.layouts, self.algos, self.gpus)
        for job in (j for g in groups for j in g.jobs):
            job["name"] = f"{job['algorithm']}-{re.sub(r'[^a-z0-9]+', '-', job['layout_name'])}"
            job["dir"] = str(self.root / "jobs" / job["name"])
        end_at = time.time() + self.args.time_budget
        for i, group in enumerate(groups):
            if time.time() >= end_at:
                for job in group.jobs:
                    self.done(job, {"status": "skipped", "error": "the run's --time-budget was used up"})
                continue
            self.pool.stop_on(set(group.trainer_gpus))
            if self.work.device == "cuda":
                self._prestart(groups[i:])
            for job in group.jobs:
                self._fill(job, data)
            jobs = [j for j in group.jobs if "config" in j]
            if jobs:
                run_group(Group(world=group.world, trainer_gpus=group.trainer_gpus, visible=group.visible, jobs=jobs),
                          env=self.trainer_env, physical=self.physical, log_dir=self.root / "logs",
                          job_timeout_s=self.args.job_timeout, end_at=end_at, on_done=self.done)

    def _prestart(self, groups: list[Group]) -> None:
        """Start the servers later groups need, on GPUs that no trainer before them will take."""
        busy: set[int] = set()
        for group in groups:
            busy |= set(group.trainer_gpus)
            for job in group.jobs:
                for key in parse_layout(job["layout_name"]).server_keys():
                    if not busy & set(server_gpus(key, self.gpus)):
                        self.pool.launch(key)

    def _fill(self, job: dict[str, Any], data: Path) -> None:
        lay = parse_layout(job["layout_name"])
        try:
            servers = tuple(self.pool.address(key) for key in lay.server_keys())
        except (ZmqDisaggError, OSError) as e:
            self.done(job, {"status": "failed", "error": f"server did not start: {e}"})
            return
        job["config"] = train_config(lay, job["algorithm"], self.work, batch=self.batch, out_dir=Path(job["dir"]),
                                     data=data, cache=self.root / "cache", servers=servers)

    def done(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        expected = expected_bytes(job["algorithm"], self.work, self.batch)
        row = report_mod.summarise(job, result, self.work.warmup, expected)
        self.rows.append(row)
        logger.info("%s %s: %s, iter %s ms, %s tokens/s/GPU, wait %s, transports %s %s", row["algorithm"],
                    row["layout"], row["status"], row.get("iter_ms_mean"), row.get("tokens_per_s_per_gpu"),
                    row.get("wait_fraction"), row["transports"], row.get("error") or "")
        self.save(final=False)

    def save(self, *, final: bool) -> None:
        self.report.update(report_mod.finish(self.rows, self.batch), complete=final)
        report_mod.write(self.report, Path(self.args.out), self.args.stem, final=final)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_cli_logging("bench")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphaned processes
    from bench._speed_machine import visible_gpus

    physical = visible_gpus()
    args.preset = args.preset or ("gpu-8b" if physical else "cpu-tiny")
    try:
        work, preset = workload(args)
        args.job_timeout = args.job_timeout or preset["job_timeout"]
        args.time_budget = args.time_budget or preset["time_budget"]
        gpus = 0 if work.device == "cpu" else len(physical) if args.gpus is None else args.gpus
        if work.device == "cuda" and not physical:
            raise ConfigError("no GPU is visible here; run --preset cpu-tiny, or fix CUDA_VISIBLE_DEVICES")
        if work.device == "cuda" and not 0 < gpus <= len(physical):
            raise ConfigError(f"--gpus {gpus}: this machine shows {len(physical)} GPUs; pass a count in "
                              f"1..{len(physical)}")
        layouts = list(dict.fromkeys(parse_layout(t) for t in [report_mod.REFERENCE, *args.layouts]))
        for lay in layouts:
            place(lay, gpus)
    except ConfigError as e:
        print(f"train_speed: {e}", file=sys.stderr)
        return 2
    root = Path(args.work or tempfile.mkdtemp(prefix="train-speed-"))
    bench = Bench(args, work, layouts, gpus, physical, root)
    started = time.time()
    try:
        bench.run()
    finally:
        bench.pool.close()
        bench.report["wall_s"] = round(time.time() - started, 1)
        bench.save(final=True)
    print(report_mod.markdown(bench.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
