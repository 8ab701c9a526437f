"""The NATS bus's header parser gives exactly what nats-py's own gives, only faster.

The bus installs it on its client (`NatsBus._install`), so every delivery's headers go
through it; any difference would change what `decode` sees.
"""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from tidings.bus.nats import parse_header_lines

EVENT_HEADERS = (
    b"ce-id: 0192d7a8-0000-7000-8000-000000000000\r\nce-source: /bench\r\n"
    b"ce-type: payment.transaction.created\r\nce-specversion: 1.0\r\n"
    b"content-type: application/json\r\nNats-Msg-Id: 0192d7a8\r\n\r\n"
)


def shapes(ch: bytes) -> list[bytes]:
    """Header blocks with byte `ch` in the name, around it, in the value, alone."""
    return [
        b"a" + ch + b"b: v\r\n",
        ch + b": v\r\n",
        b"k: " + ch + b"x" + ch + b"\r\n",
        b"k" + ch + b": v",
        b"x" + ch,
        ch + b"k" + ch + b":" + ch + b"v" + ch + b"\r\n" + ch,
        EVENT_HEADERS + ch + b"z: 1\r\n",
    ]


@pytest.mark.parametrize("byte", range(256))
def test_same_result_as_nats_py_for_every_byte(byte: int) -> None:
    for raw in shapes(bytes([byte])):
        assert parse_header_lines(raw) == Client._parse_header_lines(raw), raw


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        EVENT_HEADERS,
        b"Name:Value\r\nOther:\tspaced \r\n",
        b"dup: 1\r\ndup: 2\r\n",
        "ünï: cödé\r\nk: vàlüe\r\n".encode(),
        b"k: \xff\xfe broken utf-8\r\n",
        b"no colon here\r\n: empty name\r\n",
    ],
)
def test_same_result_as_nats_py(raw: bytes) -> None:
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_the_bus_client_uses_it() -> None:
    # nats-py calls the parser through the instance, so the bus can set its own there.
    assert isinstance(Client.__dict__["_parse_header_lines"], staticmethod)
