"""`tidings dev --cluster 3`: a local nats-server cluster on loopback, to try replication.

It starts the nodes (`tidings.bus.cluster.LocalCluster`) under ``<home>/cluster``, prints
the URL to set as ``TIDINGS_BUS`` with the settings that use it, and stops the nodes on
Ctrl-C or SIGTERM. The stores stay, so the next run starts from the same streams; delete
the folder to begin afresh. For production, see docs/production.md.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tidings.cli.common import console, guarded, options_of, print_json


def dev(
    ctx: typer.Context,
    cluster: Annotated[
        int,
        typer.Option("--cluster", min=1, max=7, help="How many nats-server nodes to start."),
    ] = 3,
    folder: Annotated[
        Path | None,
        typer.Option(
            help="Where the nodes keep their stores and logs (default: <home>/cluster).",
            show_default=False,
        ),
    ] = None,
    sync: Annotated[
        str | None,
        typer.Option(
            help="The nodes' JetStream sync_interval: 'always' (fsync each write) or a"
            " duration such as '10s' (default: the setting sync_interval, else the"
            " server's 2 min).",
            show_default=False,
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the URLs as JSON.")] = False,
) -> None:
    """Start a local NATS cluster with JetStream on loopback; Ctrl-C stops it."""
    from tidings.bus.cluster import LocalCluster

    with guarded():
        settings = options_of(ctx).settings()
        root = folder or settings.home_path / "cluster"
        nodes = LocalCluster(root, cluster, sync_interval=sync or settings.sync_interval or None)
        nodes.start(logs=True)
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if json:
            print_json({"url": nodes.url, "nodes": nodes.urls, "folder": str(root)})
        else:
            replicas = min(cluster, 3)
            console.print(f"{cluster} nats-server nodes with JetStream under {root}")
            console.print("Use it from another terminal:")
            console.print(f"  export TIDINGS_BUS={nodes.url}", soft_wrap=True)
            console.print(f"  export TIDINGS_REPLICAS={replicas} TIDINGS_PARTITIONS=16")
            console.print("  tidings run app:app --workers 4")
            console.print("Ctrl-C stops the nodes.")
        while not done.wait(1.0):
            if not any(n.running for n in nodes.nodes):
                break
    finally:
        nodes.stop()
