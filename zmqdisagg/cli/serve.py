"""``zmqdisagg-serve``: load a target model and serve it to draft trainers until SIGINT/SIGTERM.

    zmqdisagg-serve --model configs/tiny-llama.json --bind tcp://127.0.0.1:5555
    zmqdisagg-serve --model DIR --device cuda --tp 2              # spawns rank 1 itself
    torchrun --nproc-per-node 2 -m zmqdisagg.cli.serve --model DIR --device cuda

Prints one ready line (``zmqdisagg-serve ready on ADDRESS transports=...``) on stdout once it accepts
requests; with tensor parallelism only rank 0 prints it, binds the socket and talks to clients. On
SIGINT or SIGTERM it finishes the message in hand, frees every client's resources, stops the other
ranks and exits 0. If a rank fails, every rank exits non-zero within ``--tp-timeout-s``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from zmqdisagg import envs
from zmqdisagg.config import ServeConfig
from zmqdisagg.errors import ZmqDisaggError
from zmqdisagg.log import init_cli_logging

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zmqdisagg-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF model directory, or a config file such as configs/tiny-llama.json")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="tcp://HOST:PORT (PORT may be *) or ipc:///path")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (with --tp: cpu or cuda)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed of a config-built random-init target")
    p.add_argument("--transport", default=envs.ZMQDISAGG_TRANSPORT,
                   help="force one transport for every client: inline, shm, cuda_ipc or nccl")
    p.add_argument("--lease-s", type=float, default=envs.ZMQDISAGG_LEASE_S,
                   help="seconds of silence after which a client's resources are reclaimed")
    p.add_argument("--max-slots", type=int, default=envs.ZMQDISAGG_MAX_SLOTS, help="buffer slots per client")
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="most tokens in one request")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request message accepted")
    p.add_argument("--max-bench-bytes", type=int, default=1 << 30, help="largest payload of the bench op")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks; rank 0 starts the others itself "
                   "(under torchrun, WORLD_SIZE decides)")
    p.add_argument("--tp-timeout-s", type=float, default=60.0,
                   help="deadline of one collective between ranks; a stuck rank stops the server after this")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="pack requests queued together into forwards of at most this many padded tokens "
                        "(0: off; see docs/server_batching.md for how exact packed results are)")
    p.add_argument("--tp-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by rank 0 for its followers
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --bind without authentication")
    p.add_argument("--curve-secret-key", default=None, help="server NAME.key_secret file (zmqdisagg-keygen); enables CURVE")
    p.add_argument("--curve-authorized-dir", default=None, help="directory of admitted clients' public *.key files")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO or WARNING")
    return p.parse_args(argv)


class _Signals:
    """SIGINT/SIGTERM: remember when the first arrived, and stop the server once there is one."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.server: Any = None

    def __call__(self, *_: object) -> None:
        self.at = self.at or time.monotonic()
        if self.server is not None:
            self.server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from zmqdisagg.server.launch import plan_ranks, start_followers

    try:
        plan = plan_ranks(args.tp, args.tp_rank)
        init_cli_logging("serve", rank=plan.rank, level=args.log_level)
        config = _config(args, plan.world, plan.device(args.device), warn=plan.rank == 0)
    except ZmqDisaggError as e:
        print(f"zmqdisagg-serve: {e}", file=sys.stderr)
        return 2
    signals = _Signals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signals)
    if plan.world == 1:
        return _load_and_serve(config, signals)
    children = start_followers(plan, sys.argv[1:] if argv is None else argv)  # before the slow imports
    from zmqdisagg.server.ranks import RankGroup

    try:
        ranks = RankGroup(plan, config.device, timeout_s=config.tp_timeout_s, children=children)
    except ZmqDisaggError as e:
        print(f"zmqdisagg-serve rank {plan.rank}: {e}", file=sys.stderr)
        return 1
    code = 1
    try:
        code = _run_rank(config, ranks, signals)
    finally:
        ranks.close(grace_s=1.0 if code == 1 else 5.0, broken=code == 1)  # 1: a rank failed
    return code


def _config(args: argparse.Namespace, tp: int, device: str, *, warn: bool) -> ServeConfig:
    config = ServeConfig(model=args.model, bind=args.bind, device=device, dtype=args.dtype, seed=args.seed,
                         transport=args.transport, lease_s=args.lease_s, max_slots=args.max_slots,
                         max_tokens=args.max_tokens, max_request_bytes=args.max_request_bytes,
                         max_bench_bytes=args.max_bench_bytes,
                         insecure=args.insecure, curve_secret_key=args.curve_secret_key,
                         curve_authorized_dir=args.curve_authorized_dir, tp=tp,
                         tp_timeout_s=args.tp_timeout_s, batch_tokens=args.batch_tokens)
    if config.insecure and warn:  # only rank 0 binds the socket
        logger.warning("serving on %s WITHOUT authentication (--insecure): anyone who reaches this "
                       "port can read the target's outputs", config.bind)
    return config


def _run_rank(config: ServeConfig, ranks: Any, signals: _Signals) -> int:
    """Load this rank's shard, wait for every rank, then serve (rank 0) or follow (the others)."""
    import torch.distributed as dist

    from zmqdisagg.server.sharding import shard_model
    from zmqdisagg.server.tp import ControlChannel, ShardedTarget, follower_loop
    from zmqdisagg.target.build import load_target

    plan = ranks.plan
    try:
        model = load_target(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
        shard_model(model.model, plan.rank, plan.world)
    except ZmqDisaggError as e:
        print(f"zmqdisagg-serve rank {plan.rank}: {e}", file=sys.stderr)
        return 2
    channel = ControlChannel(ranks.control)
    try:
        dist.barrier(group=ranks.control)  # every rank has its shard before rank 0 takes requests
    except Exception as e:  # noqa: BLE001 - another rank failed to start; its log says why
        print(f"zmqdisagg-serve rank {plan.rank}: another rank failed to start ({e})", file=sys.stderr)
        model.close()
        return 1
    if plan.rank > 0:
        try:
            return follower_loop(model, channel, stop_requested=lambda: signals.at)
        finally:
            model.close()
    check = ranks.check if plan.launcher == "spawn" else None
    return _serve(config, ShardedTarget(model, channel, check), signals)


def _load_and_serve(config: ServeConfig, signals: _Signals) -> int:
    from zmqdisagg.target.build import load_target

    try:
        model = load_target(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    except ZmqDisaggError as e:
        print(f"zmqdisagg-serve: {e}", file=sys.stderr)
        return 2
    return _serve(config, model, signals)


def _serve(config: ServeConfig, model: Any, signals: _Signals) -> int:
    """Serve ``model`` until a signal; 1 if a tensor-parallel rank failed. Closes the model."""
    from zmqdisagg.server.server import TargetServer
    from zmqdisagg.server.tp import RankFailed

    try:
        server = TargetServer(model, config)
    except ZmqDisaggError as e:
        model.close()
        print(f"zmqdisagg-serve: {e}", file=sys.stderr)
        return 2
    signals.server = server
    if signals.at is not None:
        server.stop()  # signalled while loading
    code = 0
    try:
        print(f"zmqdisagg-serve ready on {server.address} transports={','.join(server.offered)}", flush=True)
        server.serve_forever()
    except RankFailed as e:
        print(f"zmqdisagg-serve: {e}", file=sys.stderr)
        code = 1
    finally:
        server.close()
        model.close()
        logger.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
