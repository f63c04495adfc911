"""CURVE authentication and encryption of the control plane (pyzmq's CURVE + a ZAP authenticator).

A server that binds anything but loopback must either have CURVE keys or be started with
``--insecure``. With CURVE, only clients whose public key lies in the server's authorized directory
complete the handshake; everyone else never reaches the ROUTER, so no GPU memory or shared-memory
segment is ever offered to them. Keys are files made by ``zmqdisagg-keygen`` (ZeroMQ's certificate
format: ``NAME.key`` public, ``NAME.key_secret`` secret, mode 0600).

    zmqdisagg-keygen keys/ server      # on the server host
    zmqdisagg-keygen keys/ trainer     # on each trainer host; copy trainer.key to the server's keys/authorized/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zmqdisagg.errors import ConfigError

logger = logging.getLogger(__name__)


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write a CURVE key pair ``NAME.key`` / ``NAME.key_secret`` into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def _load(path: str, flag: str, secret: bool) -> tuple[bytes, bytes | None]:
    if not path or not os.path.isfile(path):
        raise ConfigError(f"{flag}={path!r} is not a key file; create one with zmqdisagg-keygen DIR NAME")
    public, private = zmq.auth.load_certificate(path)
    if secret and private is None:
        raise ConfigError(f"{flag}={path!r} holds no secret key; pass the NAME.key_secret file")
    return public, private


class ServerAuth:
    """CURVE on the server socket plus a ZAP thread that admits only authorized public keys."""

    def __init__(self, ctx: zmq.Context, secret_file: str, authorized_dir: str) -> None:
        public, secret = _load(secret_file, "--curve-secret-key", secret=True)
        if not os.path.isdir(authorized_dir):
            raise ConfigError(f"--curve-authorized-dir={authorized_dir!r} is not a directory of client *.key files")
        self.public, self._secret = public, secret
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(Path(authorized_dir)))
        self.closed = False

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self._secret

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._auth.stop()


def apply_client(sock: zmq.Socket, server_key_file: str, client_secret_file: str) -> None:
    """Make ``sock`` a CURVE client of the server whose public key file is ``server_key_file``."""
    server_public, _ = _load(server_key_file, "--curve-server-key", secret=False)
    public, secret = _load(client_secret_file, "--curve-client-key", secret=True)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def keygen_main(argv: list[str] | None = None) -> int:
    """``zmqdisagg-keygen DIR NAME``: write a CURVE key pair."""
    p = argparse.ArgumentParser(prog="zmqdisagg-keygen", description="Create a CURVE key pair for zmqdisagg.")
    p.add_argument("directory")
    p.add_argument("name")
    args = p.parse_args(argv)
    public, secret = generate(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


if __name__ == "__main__":
    sys.exit(keygen_main())
