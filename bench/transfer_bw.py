"""Transfer bandwidth of every zmqdisagg transport against raw baselines, on this machine.

Usage (2 GPUs of one host; writes JSON, a Markdown table and a PNG plot)::

    python bench/transfer_bw.py --out docs/benchmarks
    python bench/transfer_bw.py --sizes 1M:64M --transports shm,inline,nccl --server-device cpu \\
        --client-device cpu                     # CPU smoke run (nccl runs over gloo)

What is timed, per (transport, size):

* ``get``  the client's data-plane time: reply header received -> ``Transport.get`` returned with the
  bytes in tensors the client owns (copy finished, host-synchronised). This is what the GB/s column
  and the targets use; the raw baselines are timed the same way (launch -> host sync).
* ``e2e``  request sent -> tensors owned, i.e. ``get`` plus one control round trip and the server's
  ``put``. Reported beside it.
* ``setup`` the first transfer of that size (slot allocation, IPC open, communicator warm-up).

Paths: ``transport`` drives the transports directly between two spawned processes over a ZeroMQ
``PAIR`` socket on ``ipc://`` (the server side is one thread that replies, then starts the transfer,
as ``zmqdisagg.server`` does). ``server`` goes through ``zmqdisagg-serve`` and ``RemoteTarget``
(needs the server's ``bench`` op; otherwise only its control round trip is measured).

Raw baselines in the same run: copy-engine peer copy ``dst.copy_(src)``, the native SM copy kernel
(push), and ``torch.distributed`` NCCL send/recv (default, and with ``NCCL_P2P_DISABLE=1
NCCL_SHM_DISABLE=1``). The iteration count grows until one size runs ``--min-time`` seconds
(at least ``--min-iters``, at most ``--max-iters``), like pyzmq's perf tools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

NET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}
# Labels of --transports / --server-transports that are a transport plus an environment.
LABELS = {"nccl-net": ("nccl", NET_ENV), "cuda_ipc-pack": ("cuda_ipc", {"ZMQDISAGG_CUDA_IPC_PUSH": "0"}),
          "cuda_ipc-push": ("cuda_ipc", {"ZMQDISAGG_CUDA_IPC_PUSH": "1"})}
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
PATTERN = 251  # payload[i] = i % 251: no run of equal bytes, cheap to check anywhere


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s and s[-1] in UNITS else int(s)


def sizes_from(spec: str) -> list[int]:
    """``1M:4G`` (doubling) or ``1M,16M,1G``."""
    if "," in spec:
        return [parse_size(x) for x in spec.split(",") if x]
    lo, _, hi = spec.partition(":")
    lo, hi = parse_size(lo), parse_size(hi or lo)
    out = []
    while lo <= hi:
        out.append(lo)
        lo *= 2
    return out


def human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def pattern(nbytes: int, device: str) -> torch.Tensor:
    base = torch.arange(PATTERN * 4096, dtype=torch.int64).remainder(PATTERN).to(torch.uint8)
    reps = -(-nbytes // base.numel())
    return base.to(device).repeat(reps)[:nbytes].contiguous()


def check_pattern(t: torch.Tensor) -> bool:
    n = t.numel()
    idx = torch.cat([torch.arange(min(n, 4096)), torch.arange(max(0, n - 4096), n)])
    return bool(torch.equal(t.view(torch.uint8).reshape(-1)[idx.to(t.device)].cpu(),
                            idx.remainder(PATTERN).to(torch.uint8)))


def stats(samples_s: list[float], nbytes: int) -> dict[str, Any]:
    xs = sorted(samples_s)
    p50 = statistics.median(xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"iters": len(xs), "p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "gbps": nbytes / p50 / 1e9}


def adaptive(run_once, nbytes: int, args: argparse.Namespace) -> tuple[float, list[Any]]:
    """First call is the setup time; one more warm-up; then grow the count until min_time is reached."""
    setup = run_once()
    run_once()
    samples: list[Any] = []
    n, spent = args.min_iters, 0.0
    while True:
        t0 = time.perf_counter()
        samples += [run_once() for _ in range(n)]
        spent += time.perf_counter() - t0
        if spent >= args.min_time or len(samples) >= args.max_iters:
            return setup, samples
        per = spent / len(samples)
        n = max(1, min(args.max_iters - len(samples), int((args.min_time - spent) / per) + 1))


# -- the transport path: two worker processes over a PAIR socket ----------------------------------
def worker_server(args: argparse.Namespace) -> None:
    import zmq

    from zmqdisagg import transports
    from zmqdisagg.transports.base import TransportContext

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(args.endpoint)
    src = pattern(parse_size(args.max_size), args.server_device)
    t, work = None, None
    while True:
        req = json.loads(sock.recv())
        if req["op"] == "ping":
            sock.send(b'{"op":"pong"}')
        elif req["op"] == "hello":
            t = transports.create(args.transport, TransportContext(
                role="server", connection_id=uuid.uuid4().hex[:12], device=args.server_device,
                max_slots=4, transfer_timeout_s=120.0))
            for k, v in json.loads(args.server_attrs).items():
                setattr(t, k, v)
            sock.send(json.dumps({"offer": t.offer()}).encode())
        elif req["op"] == "put":
            if work is not None:
                work.wait(120)  # the client received the last reply before asking again
            for slot in req.get("release", ()):
                t.release(slot)
            d = t.put({"payload": src[:req["nbytes"]]})
            frames = [memoryview(f) for f in d.frames]
            sock.send_multipart([json.dumps({"note": d.note, "metas": [m.to_wire() for m in d.metas],
                                             "slot": d.slot}).encode(), *frames], copy=False)
            work = d.start() if d.start is not None else None
        elif req["op"] == "bye":
            if work is not None:
                work.wait(120)
            t.close()
            sock.send(b"{}")
            break
    sock.close()
    ctx.term()


def worker_client(args: argparse.Namespace) -> None:
    import zmq

    from zmqdisagg import transports
    from zmqdisagg.protocol.tensor_meta import TensorMeta
    from zmqdisagg.transports.base import TransportContext

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.endpoint)
    cuda = args.client_device.startswith("cuda")
    rows: list[dict] = []

    def ping() -> float:
        t0 = time.perf_counter()
        sock.send(b'{"op":"ping"}')
        sock.recv()
        return time.perf_counter() - t0

    ping()
    rt = [ping() for _ in range(2000)]
    t0 = time.perf_counter()
    sock.send(b'{"op":"hello"}')
    offer = json.loads(sock.recv())["offer"]
    t = transports.create(args.transport, TransportContext(
        role="client", connection_id="bench", device=args.client_device, transfer_timeout_s=120.0))
    for k, v in json.loads(args.client_attrs).items():
        setattr(t, k, v)
    t.accept(offer)
    accept_ms = (time.perf_counter() - t0) * 1e3
    mode = getattr(t, "mode", None)  # cuda_ipc: push or pack
    pending: list[int] = []
    for nbytes in sizes_from(args.sizes):
        if nbytes > parse_size(args.max_size):
            break
        last: dict[str, Any] = {}

        def once() -> tuple[float, float]:
            t0 = time.perf_counter()
            sock.send(json.dumps({"op": "put", "nbytes": nbytes, "release": pending}).encode())
            pending.clear()
            parts = sock.recv_multipart(copy=False)
            t1 = time.perf_counter()
            rep = json.loads(parts[0].bytes)
            out = t.get(rep["note"], [TensorMeta.from_wire(m) for m in rep["metas"]], parts[1:])
            if cuda:
                torch.cuda.synchronize(args.client_device)
            t2 = time.perf_counter()
            if rep["slot"] is not None:
                pending.append(rep["slot"])
            last["out"] = out["payload"]  # held until the next reply, like a trainer (push: one slot busy)
            last["pushed"] = last.get("pushed", 0) + ("recv" in rep["note"])
            prof = getattr(t, "profile", (0.0, 0.0))
            return t2 - t1, t2 - t0, prof[0], prof[1]

        setup, samples = adaptive(once, nbytes, args)
        ok = check_pattern(last.pop("out"))
        row = {"size": nbytes, "setup_ms": setup[1] * 1e3, "verified": ok, "pushed": last.pop("pushed", 0),
               **stats([s[0] for s in samples], nbytes),
               "e2e_p50_us": statistics.median(s[1] for s in samples) * 1e6,
               "enqueue_p50_us": statistics.median(s[2] for s in samples) * 1e6,
               "wait_p50_us": statistics.median(s[3] for s in samples) * 1e6}
        rows.append(row)
        print(f"  {args.label:<10} {human(nbytes):>8}  get p50 {row['p50_us']:10.1f} us  "
              f"{row['gbps']:8.2f} GB/s  e2e {row['e2e_p50_us']:10.1f} us  ok={ok}", flush=True)
    sock.send(b'{"op":"bye"}')
    sock.recv()
    t.close()
    sock.close()
    ctx.term()
    json.dump({"rows": rows, "accept_ms": accept_ms, "mode": mode, "control_rt_us": stats(rt, 1)["p50_us"],
               "control_rt_p99_us": stats(rt, 1)["p99_us"]}, open(args.result, "w"))


def run_transport(label: str, transport: str, env: dict[str, str], args: argparse.Namespace,
                  max_size: str, server_attrs: dict | None = None, client_attrs: dict | None = None,
                  client_device: str | None = None, sizes: str | None = None) -> dict[str, Any]:
    endpoint = f"ipc://{tempfile.gettempdir()}/zmqdisagg-bench-{uuid.uuid4().hex[:8]}.sock"
    result = os.path.join(tempfile.gettempdir(), f"zmqdisagg-bench-{uuid.uuid4().hex[:8]}.json")
    common = [sys.executable, os.path.abspath(__file__), "--endpoint", endpoint, "--transport", transport,
              "--server-device", args.server_device, "--client-device", client_device or args.client_device,
              "--sizes", sizes or args.sizes, "--max-size", max_size, "--min-time", str(args.min_time),
              "--min-iters", str(args.min_iters), "--max-iters", str(args.max_iters), "--label", label,
              "--server-attrs", json.dumps(server_attrs or {}), "--client-attrs", json.dumps(client_attrs or {})]
    full_env = {**os.environ, **env}
    srv = subprocess.Popen([*common, "--_worker", "server"], env=full_env)
    try:
        cli = subprocess.run([*common, "--_worker", "client", "--result", result], env=full_env,
                             timeout=args.timeout)
        if cli.returncode != 0:
            return {"error": f"client exited {cli.returncode}"}
        srv.wait(60)
        with open(result) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    finally:
        if srv.poll() is None:
            srv.kill()
        if os.path.exists(result):
            os.unlink(result)


# -- raw baselines ---------------------------------------------------------------------------------
def raw_copy(args: argparse.Namespace, sm: bool, pull: bool = False) -> list[dict]:
    """One process, two GPUs: ``dst.copy_(src)`` (copy engine) or the SM kernel, pushing or pulling."""
    from zmqdisagg.native import pack

    s_dev, c_dev = args.server_device, args.client_device
    torch.zeros(1, device=c_dev).copy_(torch.zeros(1, device=s_dev))  # torch enables peer access
    torch.zeros(1, device=s_dev).copy_(torch.zeros(1, device=c_dev))  # both ways
    rows = []
    for nbytes in sizes_from(args.sizes):
        src = pattern(nbytes, s_dev)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=c_dev)
        launch_dev = torch.device(c_dev if pull else s_dev)
        stream = torch.cuda.current_stream(launch_dev)

        def once() -> float:
            t0 = time.perf_counter()
            if sm:
                pack.copy_bytes(dst, src, native=True, stream=stream)
            else:
                dst.copy_(src)
            torch.cuda.synchronize(s_dev)
            torch.cuda.synchronize(c_dev)
            return time.perf_counter() - t0

        with torch.cuda.device(launch_dev):
            setup, samples = adaptive(once, nbytes, args)
        rows.append({"size": nbytes, "setup_ms": setup * 1e3, "verified": check_pattern(dst),
                     **stats(samples, nbytes)})
        del src, dst
    return rows


def worker_tdist(args: argparse.Namespace) -> None:
    """One rank of a torch.distributed NCCL send/recv baseline (its own process and global group)."""
    import torch.distributed as dist

    rank = args.rank
    device = args.server_device if rank == 0 else args.client_device
    torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl", init_method=args.endpoint, rank=rank, world_size=2,
                            device_id=torch.device(device))
    rows = []
    for nbytes in sizes_from(args.sizes):
        buf = pattern(nbytes, device) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8, device=device)
        rate = 4e9 if os.environ.get("NCCL_P2P_DISABLE") == "1" else 300e9  # a guess, to size the loop
        iters = max(args.min_iters, min(args.max_iters, int(args.min_time * rate / nbytes)))
        samples = []
        for i in range(iters + 2):
            dist.barrier(device_ids=[torch.device(device).index])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.send(buf, 1) if rank == 0 else dist.recv(buf, 0)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        if rank == 1:
            rows.append({"size": nbytes, "setup_ms": samples[0] * 1e3, "verified": check_pattern(buf),
                         **stats(samples[2:], nbytes)})
        del buf
    dist.destroy_process_group()
    if rank == 1:
        json.dump({"rows": rows}, open(args.result, "w"))


def run_tdist(env: dict[str, str], args: argparse.Namespace, max_size: str) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = os.path.join(tempfile.gettempdir(), f"zmqdisagg-tdist-{uuid.uuid4().hex[:8]}.json")
    sizes = f"{args.sizes.partition(':')[0]}:{max_size}"
    common = [sys.executable, os.path.abspath(__file__), "--_worker", "tdist", "--endpoint",
              f"tcp://127.0.0.1:{port}", "--server-device", args.server_device, "--client-device",
              args.client_device, "--sizes", sizes, "--min-time", str(args.min_time), "--min-iters",
              str(args.min_iters), "--max-iters", str(args.max_iters), "--result", result]
    procs = [subprocess.Popen([*common, "--rank", str(r)], env={**os.environ, **env}) for r in (0, 1)]
    try:
        for p in procs:
            p.wait(args.timeout)
        with open(result) as f:
            return json.load(f)
    except (subprocess.TimeoutExpired, OSError) as e:
        return {"error": str(e)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _smaller(a: str, b: str) -> str:
    return a if parse_size(a) <= parse_size(b) else b


# -- the real server path ----------------------------------------------------------------------------
def run_server_path(transport: str, env: dict[str, str], args: argparse.Namespace, max_size: str) -> dict:
    """Control round trip (``stats``) and, if the server has a ``bench`` op, data through RemoteTarget."""
    from zmqdisagg.client.remote import RemoteTarget
    from zmqdisagg.config import ClientConfig
    from zmqdisagg.protocol import messages as m
    from zmqdisagg.server.spawn import spawn_server

    bind = f"ipc://{tempfile.gettempdir()}/zmqdisagg-srv-{uuid.uuid4().hex[:8]}.sock"
    out: dict[str, Any] = {"rows": []}
    os.environ.update(env)  # the client's NCCL reads it too
    extra = ("--device", args.server_device, "--max-bench-bytes", str(parse_size(max_size)))
    with spawn_server(args.model, bind=bind, transport=transport, extra=extra, env=env) as srv:
        t0 = time.perf_counter()
        with RemoteTarget([srv.address], ClientConfig(device=args.client_device, transport=transport)) as rt:
            out["accept_ms"] = (time.perf_counter() - t0) * 1e3
            out["selected"] = rt.transports[srv.address]
            conn = rt._servers[0]
            out["mode"] = getattr(conn.transport, "mode", None)  # cuda_ipc: push or pack
            rtt = []
            for _ in range(1000):  # ``info``: the lightest op, a header each way
                t1 = time.perf_counter()
                conn._call(m.INFO)
                rtt.append(time.perf_counter() - t1)
            out["control_rt_us"], out["control_rt_p99_us"] = stats(rtt, 1)["p50_us"], stats(rtt, 1)["p99_us"]
            if "bench" not in m.REQUEST_OPS:
                out["note"] = "server has no bench op: data path not measured through the server"
                return out
            for nbytes in sizes_from(args.sizes):
                if nbytes > parse_size(max_size):
                    break
                last: dict[str, Any] = {}

                def once() -> float:
                    t1 = time.perf_counter()
                    last["out"] = conn._call("bench", {"nbytes": nbytes})[1]["payload"]
                    if args.client_device.startswith("cuda"):
                        torch.cuda.synchronize(args.client_device)
                    return time.perf_counter() - t1

                setup, samples = adaptive(once, nbytes, args)
                row = {"size": nbytes, "setup_ms": setup * 1e3, "verified": check_pattern(last.pop("out")),
                       **stats(samples, nbytes)}
                row["e2e_p50_us"] = row["p50_us"]
                out["rows"].append(row)
                print(f"  server/{transport:<8} {human(nbytes):>8}  e2e p50 {row['p50_us']:10.1f} us  "
                      f"{row['gbps']:8.2f} GB/s", flush=True)
    return out


# -- report ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from zmqdisagg import gpu_probe

    info = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "machine": gpu_probe.machine_name()}
    if torch.cuda.is_available():
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def link_peak(args: argparse.Namespace) -> tuple[float | None, str]:
    from zmqdisagg import gpu_probe

    if not (args.server_device.startswith("cuda") and args.client_device.startswith("cuda")):
        return None, "host path"
    a = gpu_probe.cuda_uuid(torch.device(args.server_device).index or 0)
    b = gpu_probe.cuda_uuid(torch.device(args.client_device).index or 0)
    return gpu_probe.link_peak_gbps(a, b)


def ladder_choice(args: argparse.Namespace) -> dict[str, str]:
    """What the selection ladder picks for this device pair (the transport path forces each one)."""
    from zmqdisagg.topology import local_identity
    from zmqdisagg.transports import available
    from zmqdisagg.transports.select import choose

    names = available()
    c = choose(local_identity(args.server_device, names), local_identity(args.client_device, names))
    return {"transport": c.name, "reason": c.reason}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's numbers."""
    def by_size(name: str) -> dict[int, dict]:
        return {r["size"]: r for r in results.get(name, {}).get("rows", [])}

    ipc, ce, nccl, td = by_size("cuda_ipc"), by_size("raw-ce"), by_size("nccl"), by_size("raw-nccl")
    out = []
    big = [s for s in ipc if s >= 256 << 20 and s in ce]
    if big:
        worst = min(ipc[s]["gbps"] / ce[s]["gbps"] for s in big)
        out.append({"target": "cuda_ipc >= 0.95x raw copy engine at >= 256 MiB", "value": worst,
                    "met": worst >= 0.95})
    if (16 << 20) in ipc and (16 << 20) in ce:
        r = ipc[16 << 20]["gbps"] / ce[16 << 20]["gbps"]
        out.append({"target": "cuda_ipc >= 1.15x raw copy engine at 16 MiB", "value": r, "met": r >= 1.15})
    common = [s for s in nccl if s in td and s >= 64 << 20]
    if common:
        worst = min(nccl[s]["gbps"] / td[s]["gbps"] for s in common)
        out.append({"target": "nccl >= 0.95x torch.distributed send/recv (>= 64 MiB)", "value": worst,
                    "met": worst >= 0.95})
    rt = [v.get("control_rt_us") for k, v in results.items() if k.startswith("server/")]
    rt = [x for x in rt if x is not None] or [results.get("shm", {}).get("control_rt_us")]
    if rt and rt[0] is not None:
        out.append({"target": "control round trip <= 100 us p50 on ipc://", "value": min(rt),
                    "met": min(rt) <= 100})
    return out


def markdown(report: dict[str, Any]) -> str:
    peak = report["peak_gbps"]
    lines = [f"Machine: {report['machine']['machine']} ({report['machine']['host']}), torch "
             f"{report['machine']['torch']}, NCCL {report['machine'].get('nccl', '-')}. Server "
             f"{report['server_device']}, client {report['client_device']}. Nominal peak: "
             f"{peak if peak else '-'} GB/s ({report['peak_how']}). The ladder picks "
             f"`{report['ladder']['transport']}` for this pair ({report['ladder']['reason']}).", "",
             "| path | selected | size | p50 µs | p99 µs | GB/s | % peak | e2e p50 µs | setup ms | iters | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in report["results"].items():
        if "error" in res:
            lines.append(f"| {name} | – | – | error: {res['error']} | | | | | | | |")
            continue
        for r in res.get("rows", []):
            gpu_path = name.startswith(("cuda_ipc", "raw-ce", "raw-sm", "server/cuda")) or name in ("nccl", "raw-nccl")
            pct = f"{100 * r['gbps'] / peak:.1f}" if peak and gpu_path else "–"
            e2e = f"{r['e2e_p50_us']:.1f}" if "e2e_p50_us" in r else "–"
            lines.append(f"| {name} | {res.get('selected', name)} | {human(r['size'])} | {r['p50_us']:.1f} | "
                         f"{r['p99_us']:.1f} | {r['gbps']:.2f} | {pct} | {e2e} | {r['setup_ms']:.2f} | "
                         f"{r['iters']} | {'yes' if r['verified'] else 'NO'} |")
    lines += ["", "| connection | accept ms | control RT p50 µs | p99 µs |", "|---|---|---|---|"]
    for name, res in report["results"].items():
        if "control_rt_us" in res:
            lines.append(f"| {name} | {res.get('accept_ms', 0):.1f} | {res['control_rt_us']:.1f} | "
                         f"{res.get('control_rt_p99_us', 0):.1f} |")
    lines += ["", "| target | this run | met |", "|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, res) in enumerate(report["results"].items()):
        rows = res.get("rows", [])
        if rows:
            style = "--" if name.startswith("raw") else "-"
            ax.plot([r["size"] for r in rows], [r["gbps"] for r in rows], style, marker="o", ms=3, label=name,
                    color=colors[i % len(colors)])
    if report["peak_gbps"]:
        ax.axhline(report["peak_gbps"], color="grey", lw=0.8, ls=":", label="nominal link peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("GB/s (p50, client data-plane time)")
    ax.set_title(f"zmqdisagg transfer bandwidth — {report['machine']['machine']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M:4G", help="MIN:MAX, doubling (default 1M:4G)")
    p.add_argument("--transports", default="cuda_ipc,nccl,nccl-net,shm,inline",
                   help="comma list; nccl-net is nccl with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1; "
                        "cuda_ipc-pack / cuda_ipc-push force that cuda_ipc mode (ZMQDISAGG_CUDA_IPC_PUSH)")
    p.add_argument("--baselines", default="ce,sm,nccl,nccl-net", help="raw baselines: ce, sm, nccl, nccl-net")
    p.add_argument("--paths", default="transport,server", help="transport and/or server")
    p.add_argument("--server-transports", default=None,
                   help="transports for the server path (default: all of --transports)")
    p.add_argument("--ipc-variants", default=";".join([  # the main cuda_ipc row is the default (push)
        'cuda_ipc/pack={"client": {"push": false}}',  # the previous default: server packs, client copies
        'cuda_ipc/pack-push-ce={"client": {"push": false, "pull": false}}',  # was cuda_ipc/push
        'cuda_ipc/pack-ce-only={"client": {"push": false, "sm_copy_max_bytes": 0}}',
        'cuda_ipc/pack-ce-pack={"client": {"push": false, "sm_copy_max_bytes": 0}, '
        '"server": {"pack_sm_max_bytes": 0}}',
        'cuda_ipc/pack-nochunk={"client": {"push": false}, "server": {"min_chunk_bytes": 17179869184}}',
        'cuda_ipc/same-gpu={"client_device": "cuda:0"}',  # default on one GPU: pack + copy out
        'cuda_ipc/same-gpu-push={"client_device": "cuda:0", "client": {"push": true}}',
        # last: an SM kernel pushing into an IPC mapping is unverified; a fault only loses this row
        'cuda_ipc/push-sm={"client": {"push": true}, "server": {"push_sm_max_bytes": 67108864}}']),
        help="NAME=JSON knob sets for extra cuda_ipc runs, ';'-separated (empty: none)")
    p.add_argument("--variant-sizes", default="1M,16M,64M,256M,1G,4G", help="sizes of the variant runs")
    p.add_argument("--server-device", default="cuda:0")
    p.add_argument("--client-device", default="cuda:1")
    p.add_argument("--host-max-size", default="1G", help="largest size for shm/inline (host copies)")
    p.add_argument("--server-max-size", default="1G",
                   help="largest size through the real server (its bench op builds the payload on the CPU)")
    p.add_argument("--net-max-size", default="1G", help="largest size for nccl-net (sockets)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed transfers per size")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--timeout", type=float, default=300, help="seconds per transport run")
    p.add_argument("--model", default="configs/tiny-llama.json", help="model the server path serves")
    p.add_argument("--out", default="docs/benchmarks", help="directory for transfer_bw.{json,md,png}")
    # internal: worker processes
    p.add_argument("--_worker", choices=["server", "client", "tdist"], help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--transport", help=argparse.SUPPRESS)
    p.add_argument("--max-size", default="4G", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--server-attrs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--client-attrs", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        {"server": worker_server, "client": worker_client, "tdist": worker_tdist}[args._worker](args)
        return
    max_all = args.sizes.partition(":")[2] or args.sizes
    gpu = args.server_device.startswith("cuda") and args.client_device.startswith("cuda")
    results: dict[str, Any] = {}
    baselines = args.baselines.split(",") if gpu else []
    if "ce" in baselines:
        print("raw copy-engine peer copy", flush=True)
        results["raw-ce"] = {"rows": raw_copy(args, sm=False)}
    from zmqdisagg.native.pack import HAS_NATIVE
    if "sm" in baselines and HAS_NATIVE:
        print("raw SM copy kernel (push, then pull)", flush=True)
        results["raw-sm"] = {"rows": raw_copy(args, sm=True)}
        results["raw-sm-pull"] = {"rows": raw_copy(args, sm=True, pull=True)}
    if "nccl" in baselines:
        print("raw torch.distributed NCCL send/recv", flush=True)
        results["raw-nccl"] = run_tdist({}, args, max_all)
    if "nccl-net" in baselines:
        print("raw torch.distributed NCCL send/recv, network path", flush=True)
        results["raw-nccl-net"] = run_tdist(NET_ENV, args, args.net_max_size)
    limits = {"shm": args.host_max_size, "inline": args.host_max_size, "nccl-net": args.net_max_size}
    for label in [t for t in (args.server_transports or "").split(",") if t and t not in args.transports.split(",")]:
        transport, env = LABELS.get(label, (label, {}))  # server-path-only labels (e.g. cuda_ipc-pack)
        if "server" in args.paths:
            print(f"server path {label}", flush=True)
            try:
                results[f"server/{label}"] = run_server_path(
                    transport, env, args, _smaller(limits.get(label, max_all), args.server_max_size))
            except Exception as e:
                results[f"server/{label}"] = {"error": f"{type(e).__name__}: {e}"}
            for k in env:
                os.environ.pop(k, None)
    for label in [t for t in args.transports.split(",") if t]:
        transport, env = LABELS.get(label, (label, {}))
        if "transport" in args.paths:
            print(f"transport {label}", flush=True)
            results[label] = run_transport(label, transport, env, args, limits.get(label, max_all))
        if "server" in args.paths and label in (args.server_transports or args.transports).split(","):
            print(f"server path {label}", flush=True)
            try:
                results[f"server/{label}"] = run_server_path(
                    transport, env, args, _smaller(limits.get(label, max_all), args.server_max_size))
            except Exception as e:  # a missing server feature must not lose the transport numbers
                results[f"server/{label}"] = {"error": f"{type(e).__name__}: {e}"}
            for k in env:
                os.environ.pop(k, None)
    for spec in [v for v in args.ipc_variants.split(";") if v] if gpu else []:
        name, _, knobs = spec.partition("=")
        k = json.loads(knobs or "{}")
        print(f"variant {name}", flush=True)
        results[name] = run_transport(name, "cuda_ipc", {}, args, max_all, k.get("server"), k.get("client"),
                                      k.get("client_device"), args.variant_sizes)
    peak, how = link_peak(args)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": machine(),
              "server_device": args.server_device, "client_device": args.client_device,
              "peak_gbps": peak, "peak_how": how, "results": results, "env": {
                  k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "CUDA_", "TORCH_NCCL"))}}
    report["targets"] = targets(results)
    report["ladder"] = ladder_choice(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transfer_bw.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "transfer_bw.md"), "w") as f:
        f.write(md)
    plot(report, os.path.join(args.out, "transfer_bw.png"))
    print(md)


if __name__ == "__main__":
    main()
