"""Open the target a trainer reads from: in this process, or on ``zmqdisagg-serve`` servers.

``--target local`` loads the ``TargetModel`` on the trainer's own device. ``--target remote`` connects a
``RemoteTarget`` to ``servers`` plus ``spawn_servers`` loopback servers that this rank starts itself (so
one command shows disaggregation end to end); spawned servers load the same ``model``, dtype and seed as
a local target would, so both give bit-identical outputs.

Guarantees: everything opened is registered on the caller's ``ExitStack`` (the target is closed before
the servers it talks to are stopped); the caller's RNG is not touched.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from zmqdisagg.target.types import Target
from zmqdisagg.train.config import TrainConfig

logger = logging.getLogger(__name__)

TARGET_SEED = 0  # random-init targets (bundled configs) are built with this seed, here and in servers


def open_target(cfg: TrainConfig, device: torch.device, stack: contextlib.ExitStack) -> Target:
    if cfg.target == "local":
        from zmqdisagg.target.build import load_target

        target = load_target(cfg.model, device=str(device), dtype=cfg.target_dtype, seed=TARGET_SEED)
        stack.callback(target.close)
        return target
    from zmqdisagg.client.remote import RemoteTarget
    from zmqdisagg.config import ClientConfig

    addresses = list(cfg.servers) + _spawn(cfg, device, stack)
    client = ClientConfig(device=str(device), **({"transport": cfg.transport} if cfg.transport else {}))
    target = RemoteTarget(addresses, config=client)
    stack.callback(target.close)
    logger.info("remote target on %s (transports %s)", addresses, target.transports)
    return target


def _spawn(cfg: TrainConfig, device: torch.device, stack: contextlib.ExitStack) -> list[str]:
    if not cfg.spawn_servers:
        return []
    from zmqdisagg.server.spawn import spawn_server

    extra = ("--dtype", cfg.target_dtype, "--device", str(device), "--seed", str(TARGET_SEED))
    addresses = []
    for _ in range(cfg.spawn_servers):
        server = stack.enter_context(spawn_server(cfg.model, transport=cfg.transport, extra=extra))
        logger.info("spawned zmqdisagg-serve pid %d on %s", server.proc.pid, server.address)
        addresses.append(server.address)
    return addresses
