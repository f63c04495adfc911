"""Control-plane round trip: a bare pyzmq ping against metadata-only ops through ``zmqdisagg-serve``.

    python bench/control_rtt.py                       # ipc:// and tcp://127.0.0.1, label "current"
    python bench/control_rtt.py --label h200 --seconds 2

For each endpoint kind it measures p50/p99 of:

* ``bare``: a REQ socket in this process and a ROUTER echo loop in a child process (the floor that
  ZeroMQ and two Python processes set on this machine);
* ``info``, ``release``, ``stats``: one request each through a real ``zmqdisagg-serve`` child (tiny
  CPU config) and ``RemoteTarget``'s server connection (lane, header codec, handler, reply check).

``gap`` is ``info`` p50 minus ``bare`` p50: the Python the server and client add per request.
Results merge into ``--json`` under ``--label`` (other labels are kept, so a "before" run stays next to
an "after" run), and ``--md`` is rewritten from that JSON with one row per label and endpoint.
Each measurement runs ``--seconds`` after a warm-up; the whole bench takes about 15 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("info", "release", "stats")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=os.path.join(ROOT, "configs/tiny-llama.json"), help="server --model")
    p.add_argument("--endpoints", default="ipc,tcp", help="comma list of ipc and tcp (tcp is 127.0.0.1)")
    p.add_argument("--seconds", type=float, default=0.8, help="time spent on each op per endpoint, all rounds together")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the --seconds are split into")
    p.add_argument("--warmup", type=int, default=300, help="round trips discarded before the first round")
    p.add_argument("--label", default="current", help="key of this run in the JSON (e.g. before, after, h200)")
    p.add_argument("--json", default=os.path.join(ROOT, "docs/benchmarks/control_rtt.json"), help="results file")
    p.add_argument("--md", default=os.path.join(ROOT, "docs/benchmarks/control_rtt.md"), help="table file")
    p.add_argument("--echo", default=None, help=argparse.SUPPRESS)  # child mode: ROUTER echo on this endpoint
    return p.parse_args(argv)


def endpoint(kind: str) -> str:
    if kind == "ipc":
        return f"ipc://{tempfile.gettempdir()}/zmqdisagg-rtt-{uuid.uuid4().hex[:8]}.sock"
    if kind == "tcp":
        return "tcp://127.0.0.1:*"
    raise SystemExit(f"--endpoints: unknown kind {kind!r}; use ipc and/or tcp")


def timed(once: Callable[[], None], seconds: float, warmup: int) -> list[int]:
    """Round-trip times (ns) of ``once``, called for ``seconds`` after ``warmup`` discarded calls."""
    for _ in range(warmup):
        once()
    clock = time.perf_counter_ns
    samples: list[int] = []
    end = clock() + int(seconds * 1e9)
    while True:
        t0 = clock()
        once()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= end:
            return samples


def percentiles(samples: list[int]) -> dict[str, float]:
    samples = sorted(samples)
    n = len(samples)
    return {"p50_us": samples[n // 2] / 1e3, "p99_us": samples[min(n - 1, int(n * 0.99))] / 1e3, "n": n}


# -- (a) bare ping ---------------------------------------------------------------------------------
def echo_child(address: str) -> None:
    """ROUTER that sends every message straight back, until it is killed."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def bare_ping(ctx: zmq.Context, kind: str, children: list[subprocess.Popen]) -> Callable[[], None]:
    """A REQ round trip to an echo child; the payload has the size of an ``info`` request header."""
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo", endpoint(kind)],
                             stdout=subprocess.PIPE, text=True)
    children.append(child)
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(child.stdout.readline().strip())
    payload = b'{"v":1,"op":"info","cid":"0123456789abcdef0123456789abcdef","rid":1,"lane":0,"body":{}}'

    def once() -> None:
        sock.send(payload)
        sock.recv()

    return once


# -- (b, c) through the server ---------------------------------------------------------------------
def server_calls(address: str, stack: contextlib.ExitStack) -> dict[str, Callable[[], None]]:
    """One ``RemoteTarget`` per server; each op through its connection's ``_call`` (lane, codec, reply
    check), as ``bench/transfer_bw.py`` does, so that trees of any age are measured the same way."""
    from zmqdisagg.client.remote import RemoteTarget
    from zmqdisagg.config import ClientConfig

    rt = stack.enter_context(RemoteTarget([address], ClientConfig(transport="inline")))
    conn = rt._servers[0]  # one server: its connection is the path every call takes
    return {op: (lambda op=op: conn._call(op)) for op in OPS}


def run(kinds: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Start every server at once (start-up dominates the run time), then measure in ``--rounds``
    interleaved rounds, so that a noisy neighbour slows every column alike."""
    from concurrent.futures import ThreadPoolExecutor

    from zmqdisagg.server.spawn import start_server

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with ThreadPoolExecutor(len(kinds)) as pool:
        starts = [pool.submit(start_server, args.model, bind=endpoint(k), extra=("--transport", "inline"), env=env)
                  for k in kinds]
        servers = [f.result() for f in starts]
    ctx, children = zmq.Context(), []
    results: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            calls = {k: {"bare": bare_ping(ctx, k, children), **server_calls(s.address, stack)}
                     for k, s in zip(kinds, servers)}
            samples = {k: {name: [] for name in c} for k, c in calls.items()}
            for r in range(args.rounds):
                for k, c in calls.items():
                    for name, once in c.items():
                        warmup = args.warmup if r == 0 else args.warmup // 10
                        samples[k][name] += timed(once, args.seconds / args.rounds, warmup)
            results = {k: {name: percentiles(v) for name, v in s.items()} for k, s in samples.items()}
    finally:
        ctx.destroy(linger=0)
        for p in children:
            p.kill()
            p.wait()
        for srv in servers:
            srv.stop()
    return results


# -- report ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from zmqdisagg import gpu_probe
        gpus = gpu_probe.machine_name()
    except Exception as e:  # the probe is best effort; a report without GPUs is still a report
        gpus = f"unknown ({type(e).__name__})"
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus,
            "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


BEGIN, END = "<!-- control_rtt table: begin -->", "<!-- control_rtt table: end -->"


def table(report: dict[str, Any]) -> str:
    lines = [BEGIN, "", "µs, p50 / p99; `gap` = info p50 − bare p50.", "", "| label | machine | endpoint | bare | info | release | stats | gap |",
             "|---|---|---|---|---|---|---|---|"]
    for label, run in report.items():
        mach = run["machine"]
        where = f"{mach['host']}: {mach['cores']}× {mach['cpu']}; {mach['gpus']}"
        for kind, r in run["endpoints"].items():
            cells = [f"{r[k]['p50_us']:.0f} / {r[k]['p99_us']:.0f}" for k in ("bare", *OPS)]
            gap = r["info"]["p50_us"] - r["bare"]["p50_us"]
            lines.append(f"| {label} | {where} | {kind} | " + " | ".join(cells) + f" | {gap:.0f} |")
    return "\n".join([*lines, "", END])


def write_markdown(path: str, report: dict[str, Any]) -> None:
    """Replace the table between the markers in ``path``, keeping the prose around it."""
    text = f"# Control round trip\n\nWritten by `bench/control_rtt.py`.\n\n{BEGIN}\n{END}\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    head, found, rest = text.partition(BEGIN)
    tail = rest.partition(END)[2] if found else "\n"
    with open(path, "w") as f:
        f.write(head + table(report) + tail)


def main() -> None:
    args = parse_args()
    if args.echo:
        echo_child(args.echo)
        return
    sys.path.insert(0, ROOT)
    kinds = [k.strip() for k in args.endpoints.split(",") if k.strip()]
    report_run: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "seconds": args.seconds, "rounds": args.rounds}
    report_run["endpoints"] = results = run(kinds, args)
    for kind, r in results.items():
        print(f"{kind}: " + "  ".join(f"{k} {v['p50_us']:.0f}/{v['p99_us']:.0f} us" for k, v in r.items())
              + f"  gap {r['info']['p50_us'] - r['bare']['p50_us']:.0f} us", flush=True)
    report: dict[str, Any] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            report = json.load(f)
    report[args.label] = report_run
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(args.md, report)
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
