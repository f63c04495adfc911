"""TrainConfig validation and the zmqdisagg-train CLI (config errors, overrides, the demo path end to end)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from zmqdisagg.cli.train import build_config, main, parse_args
from zmqdisagg.errors import ConfigError
from zmqdisagg.train.config import TrainConfig
from zmqdisagg.train.demo_data import write_demo_jsonl
from zmqdisagg.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the zmqdisagg logger as a CLI does; undo that for the rest of the session."""
    root = logging.getLogger("zmqdisagg")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


@pytest.mark.parametrize("changes, field", [
    ({"target": "remote"}, "target"), ({"servers": ("tcp://127.0.0.1:5555",)}, "servers"),
    ({"teacher": "logits"}, "teacher"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"),
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads"), ({"prefetch_depth": -1}, "prefetch_depth"),
    ({"step_decay": 1.5}, "step_decay"), ({"export_engine": "trt"}, "export_engine")])
def test_invalid_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**changes)


def test_yaml_loading_coerces_numbers_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nrope_theta: 500000\nbetas: [0.9, 0.99]\nservers: tcp://a:1,tcp://b:2\ntarget: remote\n")
    cfg = TrainConfig.from_yaml(path, max_steps=7, output_dir=None)
    assert cfg.lr == 1e-3 and cfg.rope_theta == 500000.0 and cfg.betas == (0.9, 0.99)
    assert cfg.servers == ("tcp://a:1", "tcp://b:2") and cfg.max_steps == 7 and cfg.output_dir == "runs/eagle3"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text("learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        TrainConfig.from_yaml(path)
    path.write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(batch_size=6, micro_batches=4).micro_batch_size(world_size=1)


def test_cli_flags_override_the_file_and_servers_imply_remote():
    args = parse_args(["--config", "configs/demo-eagle3.yaml", "--servers", "tcp://127.0.0.1:7000",
                       "--prefetch-depth", "1", "--max-steps", "3", "--set", "lr=5e-4", "--set", "spawn_servers=0"])
    cfg = build_config(args)
    assert (cfg.target, cfg.servers, cfg.prefetch_depth, cfg.max_steps, cfg.lr) == (
        "remote", ("tcp://127.0.0.1:7000",), 1, 3, 5e-4)
    assert cfg.resume is False and TrainConfig.from_yaml("configs/demo-eagle3.yaml").resume is False


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"target": "remote"}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[train 0] ERROR" in err and "spawn_servers" in err


def test_cli_trains_against_a_spawned_server_and_exports(tmp_path):
    data = write_demo_jsonl(tmp_path / "demo.jsonl", 60, seed=1)
    cfg = {"model": "configs/tiny-llama.json", "data_path": str(data), "max_length": 64, "draft_vocab_size": 64,
           "ttt_length": 2, "batch_size": 2, "eval_samples": 4, "intermediate_size": 64, "progress": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    argv = ["--config", str(tmp_path / "tiny.yaml"), "--target", "remote", "--spawn-servers", "1",
            "--transport", "shm", "--prefetch-depth", "1", "--max-steps", "4", "--output-dir", str(out)]
    assert main(argv) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "acc_0", "loss_1", "lr", "grad_norm", "target_wait_ms", "train_ms", "tokens_per_s"} <= set(rows[0])
    assert read_metrics(out, "eval")[-1]["step"] == 4
    assert (out / "checkpoints" / "step_00000004" / "state.pt").exists()
    assert json.loads((out / "export" / "config.json").read_text())["draft_vocab_size"] == 64
    assert any(Path(out, "tensorboard").iterdir())


def test_cli_trains_a_dflash_draft_from_the_demo_config_and_exports(tmp_path):
    """configs/demo-dflash.yaml with small overrides, co-located: metrics, checkpoint, export, TensorBoard."""
    data = write_demo_jsonl(tmp_path / "demo.jsonl", 60, seed=1)
    out = tmp_path / "run"
    overrides = {"model": "configs/tiny-llama.json", "demo_target_steps": 0, "data_path": str(data),
                 "cache_dir": str(tmp_path / "cache"), "max_length": 64, "batch_size": 2, "eval_samples": 4,
                 "num_anchors": 4, "progress": False}
    argv = ["--config", "configs/demo-dflash.yaml", "--target", "local", "--spawn-servers", "0", "--max-steps", "3",
            "--output-dir", str(out)] + [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "loss_1", "acc_1", "acc_7", "accept_len", "lr", "tokens_per_s"} <= set(rows[0])
    assert "acc_0" not in rows[0] and read_metrics(out, "eval")[-1]["step"] == 3
    assert (out / "checkpoints" / "step_00000003" / "state.pt").exists()
    conf = json.loads((out / "export" / "config.json").read_text())
    assert conf["architectures"] == ["DFlashDraftModel"] and conf["dflash_config"]["target_layer_ids"] == [1, 5]
    assert any(Path(out, "tensorboard").iterdir())


def test_cli_algorithm_flag():
    cfg = build_config(parse_args(["--config", "configs/demo-eagle3.yaml", "--algorithm", "dflash"]))
    assert cfg.algorithm == "dflash" and TrainConfig.from_yaml("configs/demo-dflash.yaml").algorithm == "dflash"
