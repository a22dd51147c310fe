"""TLS certificate reload on a running broker: a broken or mismatched pair
keeps the certificate being served; the next good pair replaces it."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from tests.support.broker import BrokerProcess, RawClient, until_logged

KEEPING = "keeping the previous TLS certificate"


def served_by(b: BrokerProcess, ca: trustme.CA) -> bool:
    """Does a client trusting only ``ca`` get INFO over TLS?"""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    try:
        with RawClient(b.port, tls=ctx) as c:
            return c.read_info().name == b"hpfeeds"
    except ssl.SSLCertVerificationError:
        return False


def test_broken_or_mismatched_pair_keeps_the_served_certificate(start_broker, tmp_path: Path) -> None:
    crt, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old, new = old_ca.issue_cert("localhost", "127.0.0.1"), new_ca.issue_cert("localhost", "127.0.0.1")
    old.private_key_pem.write_to_path(str(key))
    old.cert_chain_pems[0].write_to_path(str(crt))
    b = start_broker(f"--tlskey={key}", f"--tlscert={crt}")
    assert served_by(b, old_ca)

    # The new certificate first, its key not yet: they do not match.
    until_logged(b, KEEPING, lambda: new.cert_chain_pems[0].write_to_path(str(crt)))
    assert served_by(b, old_ca) and not served_by(b, new_ca)
    # A key file that is not a key at all.
    until_logged(b, KEEPING, lambda: key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n"))
    assert served_by(b, old_ca) and not served_by(b, new_ca)
    # The matching key: the new pair is served.
    until_logged(b, "reloaded TLS certificate", lambda: new.private_key_pem.write_to_path(str(key)))
    assert served_by(b, new_ca) and not served_by(b, old_ca)
