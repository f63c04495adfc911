"""``zmqdisagg-serve``: load a target model and serve it to draft trainers until SIGINT/SIGTERM.

    zmqdisagg-serve --model configs/tiny-llama.json --bind tcp://127.0.0.1:5555

Prints one ready line (``zmqdisagg-serve ready on ADDRESS transports=...``) on stdout once it accepts
requests. On SIGINT or SIGTERM it finishes the message in hand, frees every client's resources and exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from zmqdisagg import envs
from zmqdisagg.config import ServeConfig
from zmqdisagg.errors import ZmqDisaggError
from zmqdisagg.log import init_cli_logging

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zmqdisagg-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF model directory, or a config file such as configs/tiny-llama.json")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="tcp://HOST:PORT (PORT may be *) or ipc:///path")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed of a config-built random-init target")
    p.add_argument("--transport", default=envs.ZMQDISAGG_TRANSPORT,
                   help="force one transport for every client: inline, shm, cuda_ipc or nccl")
    p.add_argument("--lease-s", type=float, default=envs.ZMQDISAGG_LEASE_S,
                   help="seconds of silence after which a client's resources are reclaimed")
    p.add_argument("--max-slots", type=int, default=envs.ZMQDISAGG_MAX_SLOTS, help="buffer slots per client")
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="most tokens in one request")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request message accepted")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --bind without authentication")
    p.add_argument("--curve-secret-key", default=None, help="server NAME.key_secret file (zmqdisagg-keygen); enables CURVE")
    p.add_argument("--curve-authorized-dir", default=None, help="directory of admitted clients' public *.key files")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO or WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_cli_logging("serve", level=args.log_level)
    from zmqdisagg.server.server import TargetServer
    from zmqdisagg.target.build import load_target

    try:
        config = ServeConfig(model=args.model, bind=args.bind, device=args.device, dtype=args.dtype,
                             seed=args.seed, transport=args.transport, lease_s=args.lease_s,
                             max_slots=args.max_slots, max_tokens=args.max_tokens,
                             max_request_bytes=args.max_request_bytes, insecure=args.insecure,
                             curve_secret_key=args.curve_secret_key,
                             curve_authorized_dir=args.curve_authorized_dir)
        if config.insecure:
            logger.warning("serving on %s WITHOUT authentication (--insecure): anyone who reaches this "
                           "port can read the target's outputs", config.bind)
        model = load_target(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
        server = TargetServer(model, config)
    except ZmqDisaggError as e:
        print(f"zmqdisagg-serve: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    try:
        print(f"zmqdisagg-serve ready on {server.address} transports={','.join(server.offered)}", flush=True)
        server.serve_forever()
    finally:
        server.close()
        model.close()
        logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
