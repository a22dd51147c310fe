"""Ready configuration for a key: what a sensor's or a collector's operator pastes.

For cowrie's ``[output_hpfeeds3]``, dionaea's hpfeeds ihandler, conpot's
``[hpfriends]``, hpfeeds-logger and this project's ``hpfeeds`` command, with
the broker's host, port, TLS, the key's ident, secret and channels filled in.
Strings go in quoted the way each format reads them (JSON strings for YAML and
JSON, shell quoting for the command); a value an INI file cannot hold (a line
break or another control character) leaves the INI snippets out.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

SECRET_UNKNOWN = "SECRET-SHOWN-WHEN-THE-KEY-WAS-MADE"


def _ini_safe(*values: str) -> bool:
    return all(v.isprintable() and v == v.strip() for v in values)


def snippets(
    host: str, port: int, tls: bool, ident: str, secret: str | None, pubchans: list[str], subchans: list[str]
) -> dict[str, str]:
    """Name -> configuration text; ``secret`` None: a placeholder (secrets are shown once)."""
    secret = secret if secret is not None else SECRET_UNKNOWN
    out: dict[str, str] = {}
    pub = pubchans[0] if pubchans else "CHANNEL"
    ini_ok = _ini_safe(host, ident, secret, *pubchans, *subchans)
    if ini_ok:
        cowrie = ["[output_hpfeeds3]", "enabled = true"]
        if tls:
            cowrie.append(f"endpoint = tls:{host}:{port}")
        else:
            cowrie += [f"server = {host}", f"port = {port}"]
        cowrie += [f"identifier = {ident}", f"secret = {secret}", f"channel = {pub}"]
        out["cowrie (etc/cowrie.cfg)"] = "\n".join(cowrie) + "\n"
        conpot = [
            "[hpfriends]",
            "enabled = True",
            f"host = {host}",
            f"port = {port}",
            f"ident = {ident}",
            f"secret = {secret}",
            f"channels = {json.dumps(pubchans or [pub])}",
        ]
        out["conpot (conpot.cfg)"] = "\n".join(conpot) + "\n"
    q = json.dumps
    dionaea = [
        "- name: hpfeeds",
        "  config:",
        f"    server: {q(host)}",
        f"    port: {port}",
        f"    ident: {q(ident)}",
        f"    secret: {q(secret)}",
    ]
    if tls:
        dionaea.append("    # TLS: dionaea's ihandler speaks plain TCP; reach a plain listener or a TLS tunnel")
    out["dionaea (ihandlers-enabled/hpfeeds.yaml)"] = "\n".join(dionaea) + "\n"
    logger: dict[str, Any] = {
        "host": host,
        "port": port,
        "ident": ident,
        "secret": secret,
        "channels": subchans or ["CHANNEL"],
        "log_file": "/var/log/hpfeeds-logger/hpfeeds.json",
        "formatter_name": "json",
    }
    if tls:
        logger["tls"] = True
    out["hpfeeds-logger (logger.json)"] = json.dumps(logger, indent=2) + "\n"
    common = ["--host", host, "-p", str(port), "-i", ident, "-s", secret] + (["--tls"] if tls else [])
    lines = []
    if pubchans:
        lines.append(shlex.join(["hpfeeds", "publish", *common, "-c", pub, "hello"]))
    if subchans:
        lines.append(shlex.join(["hpfeeds", "subscribe", *common, *(a for c in subchans for a in ("-c", c))]))
    out["hpfeeds command"] = (
        "\n".join(lines or [shlex.join(["hpfeeds", "publish", *common, "-c", pub, "hello"])]) + "\n"
    )
    return out
