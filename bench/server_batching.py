"""Server-side batching on CPU: throughput of one ``zmqdisagg-serve`` with and without ``--batch-tokens``.

Usage (from the repository root; writes ``server_batching.json`` and ``server_batching.md``)::

    OMP_NUM_THREADS=1 python bench/server_batching.py --out docs/benchmarks
    python bench/server_batching.py --clients 1,4 --seq 64 --seconds 3      # quick look
    python bench/server_batching.py --model configs/llama-3.1-8b-shape.json --device cuda --dtype bfloat16 \
        --tp 1,2 --client-device cuda:3 --transport cuda_ipc --seq 4096 --clients 1,2   # GPUs: TP and batching

What runs: one real server per ``--batch-tokens`` value (0 = batching off), and for each
(sequence length, client count) that many ``RemoteTarget`` clients in this process, each with
``--lanes`` threads sending eagle3 requests of ``[--rows, seq]`` tokens back to back. After a
warm-up, requests are counted for ``--seconds``; the server's ``stats`` give the forwards and requests
per forward over exactly that span, and its busy fraction over its 10 s window (so use
``--seconds 10`` for a busy fraction that covers one cell only).

Figures: requests/s and tokens/s summed over clients, p50 request latency, mean requests per forward,
busy fraction, and the speed-up of each batched cell over the unbatched cell with the same load.
Results are not checked here; ``tests/test_server_batching.py`` checks what batching returns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from zmqdisagg.client.remote import RemoteTarget  # noqa: E402
from zmqdisagg.config import ClientConfig  # noqa: E402
from zmqdisagg.server.spawn import spawn_server  # noqa: E402
from zmqdisagg.target.types import TargetBatch  # noqa: E402
from bench._speed_machine import cpu_name  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/tiny-llama.json")
    p.add_argument("--clients", default="1,2,4,8", help="client counts, comma-separated")
    p.add_argument("--seq", default="64,256", help="sequence lengths, comma-separated")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--lanes", type=int, default=2, help="requests in flight per client (prefetch depth)")
    p.add_argument("--batch-tokens", default="0,4096", help="server settings to compare; 0 = off")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per cell")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--transport", default="inline")
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--device", default="cpu", help="server device: cpu, or cuda (ranks on cuda:0..tp-1)")
    p.add_argument("--dtype", default="float32", help="server dtype (bfloat16 on GPUs)")
    p.add_argument("--tp", default="1", help="server tensor-parallel sizes to compare, comma-separated")
    p.add_argument("--client-device", default="cpu", help="where clients receive, e.g. cuda:3 (a GPU no rank uses)")
    p.add_argument("--out", default=None, help="directory for server_batching.json and .md")
    return p.parse_args()


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x]


def run_cell(address: str, clients: int, seq: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Drive ``clients`` clients for warm-up + ``--seconds``; return counts over the measured span."""
    cfg = ClientConfig(transport=args.transport, max_lanes=args.lanes, device=args.client_device)
    remotes = [RemoteTarget([address], cfg) for _ in range(clients)]
    stop, measuring = threading.Event(), threading.Event()
    latencies: list[float] = []
    done = [0]
    lock = threading.Lock()

    def lane(remote: RemoteTarget, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            ids = torch.randint(0, vocab, (args.rows, seq), generator=g)
            started = time.perf_counter()
            remote.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
            if measuring.is_set():
                with lock:
                    latencies.append(time.perf_counter() - started)
                    done[0] += 1

    threads = [threading.Thread(target=lane, args=(r, 1000 * c + k), daemon=True)
               for c, r in enumerate(remotes) for k in range(args.lanes)]
    try:
        for t in threads:
            t.start()
        time.sleep(args.warmup)
        before = remotes[0].stats()[address]["utilisation"]
        measuring.set()
        t0 = time.perf_counter()
        time.sleep(args.seconds)
        measuring.clear()
        span = time.perf_counter() - t0
        after = remotes[0].stats()[address]["utilisation"]
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        for r in remotes:
            r.close()
    forwards = after["forwards"] - before["forwards"]
    served = after["requests"] - before["requests"]
    return {"clients": clients, "seq": seq, "rows": args.rows, "lanes": args.lanes, "requests": done[0],
            "seconds": round(span, 3), "req_per_s": round(done[0] / span, 1),
            "tokens_per_s": round(done[0] * args.rows * seq / span, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "requests_per_forward": round(served / forwards, 2) if forwards else None,
            "busy_fraction": after["busy_fraction"], "padding_fraction": after["padding_fraction"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| tp | batch-tokens | seq | clients × lanes | req/s | tokens/s | p50 ms | req/forward | busy | speed-up |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    base = {(r["seq"], r["clients"]): r["req_per_s"] for r in rows if r["batch_tokens"] == 0 and r["tp"] == 1}
    lines = []
    for r in rows:
        ref = base.get((r["seq"], r["clients"]))
        speedup = f"{r['req_per_s'] / ref:.2f}×" if ref else "-"
        lines.append(f"| {r['tp']} | {r['batch_tokens']} | {r['seq']} | {r['clients']} × {r['lanes']} | {r['req_per_s']} | "
                     f"{r['tokens_per_s']:.0f} | {r['p50_ms']} | {r['requests_per_forward']} | "
                     f"{r['busy_fraction']:.2f} | {speedup} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    env = {"OMP_NUM_THREADS": str(args.server_threads)}
    rows = []
    for tp in ints(args.tp):
        for budget in ints(args.batch_tokens):
            device = args.device if tp > 1 or args.device == "cpu" else f"{args.device}:0"
            extra = ("--batch-tokens", str(budget), "--tp", str(tp), "--device", device, "--dtype", args.dtype)
            with spawn_server(args.model, extra=extra, env=env) as srv:
                with RemoteTarget([srv.address]) as probe:
                    vocab = probe.info().vocab_size
                for seq in ints(args.seq):
                    for clients in ints(args.clients):
                        row = {"tp": tp, "batch_tokens": budget, **run_cell(srv.address, clients, seq, args, vocab)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "server_device": args.device,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "python": platform.python_version(), "torch": torch.__version__,
               "server_threads": args.server_threads, "client_threads_env": os.environ.get("OMP_NUM_THREADS")}
    table = markdown(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "server_batching.json"), "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "server_batching.md"), "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
