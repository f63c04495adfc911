"""Logging setup for the CLIs only; library modules just call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys

from zmqdisagg import envs


def init_cli_logging(role: str, rank: int = 0, level: str | None = None) -> None:
    """Send zmqdisagg's logs to stderr with a ``[role rank]`` prefix."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{role} {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("zmqdisagg")
    root.handlers[:] = [handler]
    root.setLevel((level or envs.ZMQDISAGG_LOG_LEVEL or "INFO").upper())
    root.propagate = False
