"""What reaches a broker through NATS is checked, and NATS itself can be closed:
user and password, NKey, TLS with a client certificate, against a real nats-server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nkeys
import trustme

from hpfeeds3.broker.backplane.subjects import channel_to_subject
from hpfeeds3.broker.backplane.wire import headers
from hpfeeds3.protocol import encode_error, encode_publish
from tests.cluster.nodes import healthz, metric, nats_publish, seen_on_nats, start_node, wait_linked, write_keys
from tests.support.broker import RawClient, confirm_subscribed
from tests.support.nats import NatsServer, operator_mode

REJECTED = "hpfeeds_broker_cluster_rejected_total"


def cross_node_delivery_works(a, b) -> None:
    for node in (a, b):
        node.wait_ready()
        wait_linked(node)
    with RawClient(b.port) as sub, RawClient(a.port) as pub:
        sub.auth("n1", "n1-secret")
        sub.subscribe("plain")
        pub.auth("n0", "n0-secret")
        confirm_subscribed(pub, "plain", sub)  # b's NATS subscription is in place
        pub.publish("plain", b"across")
        got = sub.messages(1)[0]
        assert (got.ident, got.channel, got.payload) == (b"n0", b"plain", b"across")


def test_only_whole_publish_frames_of_the_subjects_channel_are_delivered(tmp_path, nats) -> None:
    keys = write_keys(tmp_path, ["plain", "other"])
    a, b = start_node(tmp_path, nats.url, keys), start_node(tmp_path, nats.url, keys)
    try:
        for node in (a, b):
            node.wait_ready()
            wait_linked(node)
        with RawClient(b.port) as sub, RawClient(a.port) as pub:
            sub.auth("n1", "n1-secret")
            sub.subscribe("plain")
            pub.auth("n0", "n0-secret")
            confirm_subscribed(pub, "plain", sub)  # b's NATS subscription is in place
            forged = "feedfacefeedface"
            subject = channel_to_subject(b"plain")
            frame = encode_publish(b"trusted-sensor", b"plain", b"injected")
            nats_publish(
                nats.url,
                [
                    (subject, frame, None),  # no broker headers
                    (subject, encode_error("collector: stop"), headers(forged, 0, 1)),
                    (subject, encode_publish(b"trusted-sensor", b"other", b"x"), headers(forged, 1, 1)),
                    (subject, frame[:-3], headers(forged, 2, 1)),
                    (subject, frame + frame, headers(forged, 3, 1)),
                ],
            )
            pub.publish("plain", b"genuine")
            got = sub.messages(1)[0]
            assert (got.ident, got.payload) == (b"n0", b"genuine")
            sub.expect_silence(0.5)
        for reason in ("headers", "not_publish", "channel", "partial", "count"):
            assert metric(b, f'{REJECTED}{{reason="{reason}"}}') == 1, reason
        log = b.wait_log("dropped a message from NATS")
        deadline = time.monotonic() + 5  # the second line may be a moment behind (the log thread)
        while log.count("dropped a message from NATS") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            log = b.log()
        assert log.count("dropped a message from NATS") == 2  # once per origin ("?" and the forged one)
        assert "origin feedfacefeedface" in log
    finally:
        a.stop()
        b.stop()


def _users_conf(users: dict[str, str]) -> str:
    """nats.conf authorization: each broker user may publish and subscribe on hpfeeds.> only."""
    entries = ",\n".join(
        f'    {{user: "{u}", password: "{p}", permissions: {{publish: "hpfeeds.>", subscribe: "hpfeeds.>"}}}}'
        for u, p in users.items()
    )
    return f"authorization {{\n  users = [\n{entries}\n  ]\n}}\n"


def test_a_nats_requiring_user_and_password(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path, extra=_users_conf({"broker-a": "pw-a-123456", "broker-b": "pw-b-123456"})).start()
    (tmp_path / "pw-b").write_text("pw-b-123456\n")
    (tmp_path / "wrong").write_text("not-the-password\n")
    keys = write_keys(tmp_path)
    url_a = nats.url.replace("nats://", "nats://broker-a:pw-a-123456@")
    a = start_node(tmp_path, url_a, keys)
    b = start_node(tmp_path, nats.url, keys, "--cluster-user", "broker-b", "--cluster-password-file", "pw-b")
    c = start_node(tmp_path, nats.url, keys, "--cluster-user", "broker-b", "--cluster-password-file", "wrong")
    try:
        cross_node_delivery_works(a, b)
        c.wait_ready()
        c.wait_log("refused our credentials", timeout=10)
        assert healthz(c)["status"] == "degraded"
        assert healthz(c)["cluster"] == "unauthorized", c.log()
        assert "pw-a-123456" not in a.log()
    finally:
        for node in (a, b, c):
            node.stop()
        nats.stop()


def test_a_nats_requiring_a_token(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path, extra='authorization { token: "tok-0123456789" }\n').start()
    (tmp_path / "token").write_text("tok-0123456789\n")
    keys = write_keys(tmp_path)
    a = start_node(tmp_path, nats.url, keys, "--cluster-token-file", "token")
    b = start_node(tmp_path, nats.url.replace("nats://", "nats://tok-0123456789@"), keys)
    try:
        cross_node_delivery_works(a, b)
        assert "tok-0123456789" not in a.log() + b.log()
    finally:
        a.stop()
        b.stop()
        nats.stop()


def test_a_nats_requiring_an_nkey(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "broker.nk").write_bytes(seed + b"\n")
    nats = NatsServer(tmp_path, extra=f'authorization {{ users = [ {{nkey: "{public}"}} ] }}\n').start()
    keys = write_keys(tmp_path)
    a = start_node(tmp_path, nats.url, keys, "--cluster-nkey", "broker.nk")
    b = start_node(tmp_path, nats.url, keys, "--cluster-nkey", "broker.nk")
    try:
        cross_node_delivery_works(a, b)
    finally:
        a.stop()
        b.stop()
        nats.stop()


def test_a_nats_trusting_an_operator_and_a_credentials_file(tmp_path: Path) -> None:
    conf, (creds_a, creds_b) = operator_mode(tmp_path, 2)
    nats = NatsServer(tmp_path, extra=conf).start()
    _, (stranger,) = operator_mode(tmp_path / "other", 1)
    keys = write_keys(tmp_path)
    a = start_node(tmp_path, nats.url, keys, "--cluster-creds", str(creds_a))
    b = start_node(tmp_path, nats.url, keys, "--cluster-creds", str(creds_b))
    c = start_node(tmp_path, nats.url, keys, "--cluster-creds", str(stranger))
    try:
        cross_node_delivery_works(a, b)
        c.wait_ready()
        c.wait_log("refused our credentials", timeout=10)
    finally:
        for node in (a, b, c):
            node.stop()
        nats.stop()


def test_nats_over_tls_with_client_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "nats.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "nats.key"))
    client = ca.issue_cert("broker.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "broker.crt"))
    client.private_key_pem.write_to_path(str(tmp_path / "broker.key"))
    tls = (
        f'tls {{\n  cert_file: "{tmp_path}/nats.crt"\n  key_file: "{tmp_path}/nats.key"\n'
        f'  ca_file: "{tmp_path}/ca.pem"\n  verify: true\n}}\n'
    )
    nats = NatsServer(tmp_path, extra=tls).start()
    keys = write_keys(tmp_path)
    flags = ("--cluster-tls-ca", "ca.pem", "--cluster-tls-cert", "broker.crt", "--cluster-tls-key", "broker.key")
    a = start_node(tmp_path, nats.url, keys, *flags)
    b = start_node(tmp_path, nats.url, keys, *flags)
    no_cert = start_node(tmp_path, nats.url, keys, "--cluster-tls-ca", "ca.pem")
    try:
        cross_node_delivery_works(a, b)
        no_cert.wait_ready()
        deadline = time.monotonic() + 15
        while not any(said in no_cert.log() for said in ("unreachable", "refused our credentials", "NATS error")):
            assert time.monotonic() < deadline, f"no failed link logged:\n{no_cert.log()[-2000:]}"
            time.sleep(0.05)
        assert healthz(no_cert)["status"] == "degraded"
        assert "linked to NATS" not in no_cert.log()
    finally:
        for node in (a, b, no_cert):
            node.stop()
        nats.stop()


def test_with_a_cluster_key_a_nats_client_cannot_speak_as_a_broker(tmp_path, nats) -> None:
    """Brokers sharing ``--cluster-key-file`` sign every message; a NATS client
    without the key cannot publish as one of them, even with a real origin or a
    real message's signature, and a broker with another key is not heard."""
    keys = write_keys(tmp_path, ["plain"])
    (tmp_path / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    (tmp_path / "other.key").write_text(os.urandom(32).hex() + "\n")
    a = start_node(tmp_path, nats.url, keys, "--cluster-key-file", "cluster.key")
    b = start_node(tmp_path, nats.url, keys, "--cluster-key-file", "cluster.key")
    c = start_node(tmp_path, nats.url, keys, "--cluster-key-file", "other.key")
    try:
        cross_node_delivery_works(a, b)
        c.wait_ready()
        wait_linked(c)
        with RawClient(b.port) as sub, RawClient(a.port) as pub, RawClient(c.port) as stranger:
            sub.auth("n1", "n1-secret")
            sub.subscribe("plain")
            pub.auth("n0", "n0-secret")
            signed = seen_on_nats(nats.url, pub)
            origin = signed["Hpfeeds-Origin"]
            sub.messages(1)  # the one b got of those
            while True:  # and any other copy still on its way
                try:
                    sub.next_frame(0.5)
                except TimeoutError:
                    break
            subject = channel_to_subject(b"plain")
            forged = encode_publish(b"n0", b"plain", b"injected")
            seq = int(signed["Hpfeeds-Seq"]) + 1000
            nats_publish(
                nats.url,
                [
                    (subject, forged, headers(origin, seq, 1)),  # a real origin, unsigned
                    (subject, forged, {**signed, "Hpfeeds-Seq": str(seq + 1)}),  # a real signature, other content
                ],
            )
            stranger.auth("n2", "n2-secret")
            stranger.publish("plain", b"from another key")
            pub.publish("plain", b"genuine")
            got = sub.messages(1)[0]
            assert (got.ident, got.payload) == (b"n0", b"genuine")
            sub.expect_silence(0.5)
        deadline = time.monotonic() + 5
        while metric(b, f'{REJECTED}{{reason="signature"}}') < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(b, f'{REJECTED}{{reason="signature"}}') == 3
    finally:
        for node in (a, b, c):
            node.stop()
