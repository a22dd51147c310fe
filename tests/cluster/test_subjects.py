"""Channel ↔ NATS subject: reversible, always one valid token."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpfeeds3.broker.backplane.subjects import channel_to_subject, subject_to_channel

TOKEN = re.compile(r"[^.*> \t\r\n]+")


@given(st.binary(min_size=1, max_size=255))
def test_round_trip_and_single_token(channel: bytes) -> None:
    subject = channel_to_subject(channel)
    prefix, token = subject.split(".", 1)
    assert prefix == "hpfeeds"
    assert TOKEN.fullmatch(token)
    assert subject_to_channel(subject) == channel


@pytest.mark.parametrize(
    ("channel", "subject"),
    [
        (b"cowrie.sessions", "hpfeeds.cowrie%2Esessions"),
        (b"a*b>c d", "hpfeeds.a%2Ab%3Ec%20d"),
        ("café".encode(), "hpfeeds.caf%C3%A9"),
        (b"100%", "hpfeeds.100%25"),
    ],
)
def test_examples(channel: bytes, subject: str) -> None:
    assert channel_to_subject(channel) == subject


def test_distinct_channels_never_share_a_subject() -> None:
    assert channel_to_subject(b"a.b") != channel_to_subject(b"a%2Eb")
