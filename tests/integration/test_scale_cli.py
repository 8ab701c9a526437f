"""`tidings dev --cluster 3` and the replication check of `tidings doctor`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tidings.bus.nats import NatsBus
from tidings.cli.doctor import catching_up, cluster_result

pytestmark = pytest.mark.nats


def read_json(process: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, object]:
    """The JSON document the command prints first (indented over several lines)."""
    assert process.stdout is not None
    text = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        text += line
        try:
            return dict(json.loads(text))
        except ValueError:
            continue
    raise AssertionError(f"no JSON from the command: {text!r}")


async def replication(url: str) -> dict[str, Any]:
    bus = NatsBus(url, namespace="devcheck", replicas=3)
    await bus.connect()
    try:
        return await bus.server_info()
    finally:
        await bus.close()


def test_dev_cluster_starts_three_replicating_nodes_and_stops_them(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tidings.cli", "dev", "--cluster", "3", "--sync", "always",
               "--folder", str(tmp_path / "cluster"), "--json"]  # fmt: skip
    env = {**os.environ, "TIDINGS_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        shown = read_json(process)
        nodes = shown["nodes"]
        assert isinstance(nodes, list) and len(nodes) == 3
        # A new stream's copies catch up with its leader a moment after it is created.
        deadline = time.monotonic() + 20
        while True:
            info = asyncio.run(replication(str(shown["url"])))
            result = cluster_result(info, 3)
            if result.ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result.ok is True, result
        assert info["streams"]["DEVCHECK_EVENTS"]["replicas"] == 3
        # --sync always reached every node's JetStream (its monitoring port says so).
        for conf in sorted((tmp_path / "cluster").glob("n*.conf")):
            assert "sync_interval: always" in conf.read_text()
        log = (tmp_path / "cluster" / "n1.log").read_text()
        assert "JetStream" in log
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
        assert process.stdout is not None
        process.stdout.close()
    assert code == 0
    for url in nodes:  # every node stopped with it
        port = int(str(url).rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_doctor_refuses_replicas_a_single_server_cannot_keep() -> None:
    info = {"backend": "nats", "version": "2.15.1", "cluster": None, "streams": {}}
    assert cluster_result(info, 1).ok is None  # informational: one copy, as asked
    refused = cluster_result(info, 3)
    assert refused.ok is False and refused.fix and "cluster of at least 3" in refused.fix


def test_doctor_names_a_stream_without_leader_or_with_copies_behind() -> None:
    info = {
        "backend": "nats", "version": "2.15.1", "cluster": "c", "cluster_urls": ["a", "b"],
        "partitions": 16,
        "streams": {
            "T_EVENTS": {"replicas": 3, "leader": "n2",
                         "peers": [{"name": "n1", "current": False, "offline": True}]},
            "T_DLQ": {"replicas": 3, "leader": None, "peers": []},
        },
    }  # fmt: skip
    result = cluster_result(info, 3)
    assert result.ok is False
    text = "\n".join(result.details)
    assert "n1 are offline or behind" in text and "T_DLQ has no leader" in text
    assert "16 partitions" in text


async def test_the_embedded_server_takes_the_sync_interval_setting(tmp_path: Path) -> None:
    from tidings.bus.embedded import EmbeddedNats

    embedded = EmbeddedNats(tmp_path / "home", sync_interval="always")
    url = await embedded.ensure()
    try:
        assert "sync_interval: always" in (tmp_path / "home" / "nats.conf").read_text()
        bus = NatsBus(url, namespace="synccheck")
        await bus.connect()
        await bus.close()
    finally:
        embedded.stop()


def test_a_sync_interval_nats_server_cannot_read_is_refused_with_the_fix() -> None:
    from tidings.bus.embedded import check_sync_interval
    from tidings.errors import ConfigError

    assert check_sync_interval("10s") == "10s"
    with pytest.raises(ConfigError, match="'always' or a duration"):
        check_sync_interval("fast")


def test_doctor_waits_for_a_new_streams_copies_but_not_for_an_offline_one() -> None:
    def info(peer: dict[str, object], leader: str | None = "n1") -> dict[str, Any]:
        return {"streams": {"T_DLQ": {"replicas": 3, "leader": leader,
                                      "peers": [{"name": "n3", **peer}]}}}  # fmt: skip

    assert catching_up(info({"current": False, "offline": False}))  # read again
    assert not catching_up(info({"current": False, "offline": True}))  # a real fault
    assert not catching_up(info({"current": True, "offline": False}))
    assert not catching_up(info({"current": False, "offline": False}, leader=None))
