"""CURVE admits only authorized trainers; non-loopback binds need keys or --insecure."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig, ServeConfig
from zmqdisagg.errors import ConfigError, PeerTimeout
from zmqdisagg.security import generate
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.types import TargetBatch


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path):
    with pytest.raises(ConfigError, match="--insecure"):
        ServeConfig(model="m", bind="tcp://0.0.0.0:5555")
    assert ServeConfig(model="m", bind="tcp://0.0.0.0:5555", insecure=True).insecure
    assert ServeConfig(model="m", bind="tcp://0.0.0.0:5555", curve_secret_key="k", curve_authorized_dir="d")
    with pytest.raises(ConfigError, match="go together"):
        ServeConfig(model="m", curve_secret_key="k")
    for loopback in ("tcp://127.0.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x"):
        assert ServeConfig(model="m", bind=loopback).bind == loopback


def test_curve_admits_only_authorized_clients(tmp_path):
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    _, server_secret = generate(str(keys), "server")
    trainer_public, trainer_secret = generate(str(keys), "trainer")
    _, stranger_secret = generate(str(keys), "stranger")
    shutil.copy(trainer_public, authorized)
    assert os.stat(server_secret).st_mode & 0o777 == 0o600
    server_public = str(keys / "server.key")
    extra = ("--curve-secret-key", server_secret, "--curve-authorized-dir", str(authorized))
    with spawn_server("configs/tiny-llama.json", extra=extra) as srv:
        cfg = ClientConfig(curve_server_key=server_public, curve_client_key=trainer_secret)
        with RemoteTarget([srv.address], cfg) as remote:
            ids = torch.arange(6).reshape(1, 6)
            out = remote.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
            assert out["aux_hidden"].shape[1] == 6
        quick = dict(attempt_timeout_s=0.5, request_timeout_s=1.0, connect_timeout_s=1.0)
        with pytest.raises(PeerTimeout):
            RemoteTarget([srv.address], ClientConfig(curve_server_key=server_public,
                                                     curve_client_key=stranger_secret, **quick))
        with pytest.raises(PeerTimeout):
            RemoteTarget([srv.address], ClientConfig(**quick))  # no keys at all
    with pytest.raises(ConfigError, match="zmqdisagg-keygen"):
        RemoteTarget(["tcp://127.0.0.1:1"], ClientConfig(curve_server_key=str(tmp_path / "none.key"),
                                                          curve_client_key=trainer_secret))
