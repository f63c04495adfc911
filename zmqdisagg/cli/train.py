"""``zmqdisagg-train``: train an EAGLE3 or DFlash draft against a local or remote target.

    zmqdisagg-train --config configs/demo-eagle3.yaml
    zmqdisagg-train --config configs/demo-dflash.yaml
    zmqdisagg-train --config configs/demo-eagle3.yaml --target remote --servers tcp://10.0.0.2:5555
    torchrun --nproc-per-node 2 -m zmqdisagg.cli.train --config configs/demo-eagle3.yaml

Flags override the YAML file; see ``zmqdisagg.train.config.TrainConfig`` for every key. Exit codes:
0 done, 2 bad configuration, 1 any other zmqdisagg error (the message says what to change).
"""

from __future__ import annotations

import argparse
import logging
import os

from zmqdisagg.errors import ConfigError, ZmqDisaggError
from zmqdisagg.log import init_cli_logging

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zmqdisagg-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file of TrainConfig keys, e.g. configs/demo-eagle3.yaml")
    p.add_argument("--algorithm", choices=("eagle3", "dflash"), help="which draft to train")
    p.add_argument("--target", choices=("local", "remote"), help="where the target model runs")
    p.add_argument("--servers", help="remote: comma-separated server addresses, tcp://HOST:PORT[,...]")
    p.add_argument("--spawn-servers", type=int, help="remote: start N loopback servers of the model")
    p.add_argument("--transport", help="remote: force a data-plane transport (inline, shm, ...)")
    p.add_argument("--prefetch-depth", type=int, help="target requests kept in flight (0 = synchronous)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    p.add_argument("--output-dir", help="metrics.jsonl, checkpoints/, export/ go here")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig key (VALUE parsed as YAML), e.g. --set lr=3e-4")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO or WARNING")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):  # -> TrainConfig (imported lazily: torch is heavy)
    import yaml

    from zmqdisagg.train.config import TrainConfig

    implied = "remote" if (args.servers or args.spawn_servers) and args.target is None else None
    overrides = {"algorithm": args.algorithm, "target": args.target or implied, "servers": args.servers,
                 "spawn_servers": args.spawn_servers, "transport": args.transport,
                 "prefetch_depth": args.prefetch_depth, "max_steps": args.max_steps, "output_dir": args.output_dir,
                 "resume": args.resume}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return TrainConfig.from_yaml(args.config, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_cli_logging("train", int(os.environ.get("RANK", "0")), args.log_level)
    try:
        cfg = build_config(args)
        from zmqdisagg.train.loop import Trainer
        from zmqdisagg.train.metrics import headline_text

        trainer = Trainer(cfg)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    try:
        summary = trainer.run()
        if "train" in summary and summary["train"]:
            last = summary["train"]
            logger.info("done: step %d loss %.4f %s", last["step"], last["loss"],
                        headline_text(last, trainer.algo.headline))
        if "export" in summary:
            logger.info("exported draft to %s", summary["export"])
    except ZmqDisaggError as e:
        logger.error("%s", e)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
