"""CURVE encryption and authentication between tiers.

A key directory (``chameleon keys gen DIR``) holds two key pairs in ZeroMQ's certificate format:
``server.key``/``server.key_secret`` for every process that binds (retrieval nodes, the
coordinator) and ``client.key``/``client.key_secret`` for every process that connects (the
coordinator towards nodes, users towards the coordinator). Servers accept only clients whose
public key is in ``DIR/authorized/``; a peer without the keys completes no handshake and gets
no answer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from retriever.errors import InvalidInput


@dataclass(frozen=True)
class CurveKeys:
    directory: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def load(cls, directory: str | Path) -> CurveKeys:
        directory = Path(directory)
        try:
            server_public, server_secret = zmq.auth.load_certificate(directory / "server.key_secret")
            client_public, client_secret = zmq.auth.load_certificate(directory / "client.key_secret")
        except (OSError, ValueError) as e:
            raise InvalidInput(f"{directory} is not a key directory made by `chameleon keys gen`: {e}") from None
        if not (directory / "authorized").is_dir():
            raise InvalidInput(f"{directory}/authorized (the accepted client keys) is missing")
        return cls(directory, server_public, server_secret, client_public, client_secret)


def generate_keys(directory: str | Path, force: bool = False) -> Path:
    """Write a server and a client key pair, and authorise the client key."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise InvalidInput(f"{directory} already holds files (use --force to replace the keys)")
    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(directory, "server")
    zmq.auth.create_certificates(directory, "client")
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copy(directory / "client.key", authorized / "client.key")
    for secret in directory.glob("*.key_secret"):
        secret.chmod(0o600)
    return directory


def secure_server(context: zmq.Context, socket: zmq.Socket, keys: CurveKeys | None) -> ThreadAuthenticator | None:
    """Make ``socket`` (before bind) a CURVE server that admits only authorised clients."""
    if keys is None:
        return None
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(keys.directory / "authorized"))
    socket.curve_secretkey = keys.server_secret
    socket.curve_publickey = keys.server_public
    socket.curve_server = True
    return authenticator


def secure_client(socket: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make ``socket`` (before connect) a CURVE client of our servers."""
    if keys is None:
        return
    socket.curve_secretkey = keys.client_secret
    socket.curve_publickey = keys.client_public
    socket.curve_serverkey = keys.server_public
