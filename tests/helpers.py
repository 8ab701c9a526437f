"""Helpers for tests that run real workers: polling, settings, raw stream inspection."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats

from tidings import App, Settings
from tidings.worker import Worker


async def eventually(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll until `condition` is true; fail after `timeout` seconds (no timing asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(interval)


def settings_for(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str | None = None, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "bus": nats_url,
        "namespace": namespace,
        "home": str(tmp_path / "home"),
        "store": store_url or f"sqlite:///{tmp_path / 'store.db'}",
        "ack_wait": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(app: App, settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(app, settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace=5)


async def subject_counts(nats_url: str, namespace: str, filter_subject: str) -> dict[str, int]:
    """Messages stored per subject in the events stream (to count outputs exactly)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(f"{namespace.upper()}_EVENTS", subjects_filter=filter_subject)
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


async def publish_raw(nats_url: str, subject: str, body: bytes, headers: dict[str, str]) -> None:
    """Publish bytes the way a foreign or broken producer would."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(subject, body, headers=headers or None)
    finally:
        await nc.close()


# -- the same helpers for every bus backend (nats://, kafka://, memory://) ---------------


async def stored_counts(bus_url: str, namespace: str, pattern: str) -> dict[str, int]:
    """Events stored on the bus per type, for types matching `pattern` (to count outputs)."""
    from tidings.events import matches

    scheme = bus_url.split("://", 1)[0]
    if scheme == "nats":
        prefix = f"{namespace}.events."
        counts = await subject_counts(bus_url, namespace, prefix + pattern)
        return {subject.removeprefix(prefix): n for subject, n in counts.items()}
    types: list[str] = []
    if scheme == "kafka":
        from tidings.bus.kafka import KafkaBus
        from tidings.bus.kafka_history import read_all

        bus = KafkaBus(bus_url, namespace=namespace)
        await bus.connect()
        try:
            topics = [t for t in await _kafka_topics(bus) if t.startswith(f"{namespace}.events.")]
            for topic in topics:
                for record in await read_all(bus, topic):
                    types.append(dict(record.headers).get("ce_type", b"").decode())
        finally:
            await bus.close()
    else:
        from tidings.bus.memory import MemoryBus

        memory = MemoryBus(bus_url, namespace=namespace)
        await memory.connect()
        types = [m.type for m in memory.broker.log if m.target is None]
    out: dict[str, int] = {}
    for type_ in types:
        if matches(pattern, type_):
            out[type_] = out.get(type_, 0) + 1
    return out


async def _kafka_topics(bus: Any) -> list[str]:
    topics: list[str] = await bus.admin().list_topics()
    return topics


async def publish_raw_event(
    bus_url: str, namespace: str, type_: str, body: bytes, headers: dict[str, str]
) -> None:
    """Put bytes on the bus where events of `type_` go, as a foreign or broken producer."""
    scheme = bus_url.split("://", 1)[0]
    if scheme == "nats":
        await publish_raw(bus_url, f"{namespace}.events.{type_}", body, headers)
    elif scheme == "kafka":
        from tidings.bus.kafka import KafkaBus

        bus = KafkaBus(bus_url, namespace=namespace)
        await bus.connect()
        try:
            await bus._send(bus.event_topic(type_), headers, body, None)
        finally:
            await bus.close()
    else:
        from tidings.bus.memory import MemoryBus

        memory = MemoryBus(bus_url, namespace=namespace)
        await memory.connect()
        subject = f"{namespace}.events.{type_}"
        memory.broker.append(memory.broker.message(subject, type_, headers, body, None))


async def stored_kafka_ids(bus_url: str, namespace: str, pattern: str) -> list[str]:
    """The ids of the events stored on Kafka whose type matches `pattern`, repeats included."""
    from tidings.bus.kafka import KafkaBus
    from tidings.bus.kafka_history import read_all
    from tidings.events import matches

    bus = KafkaBus(bus_url, namespace=namespace)
    await bus.connect()
    try:
        ids = []
        for topic in await _kafka_topics(bus):
            if topic.startswith(f"{namespace}.events."):
                for record in await read_all(bus, topic):
                    headers = dict(record.headers)
                    if matches(pattern, headers.get("ce_type", b"").decode()):
                        ids.append(headers.get("ce_id", b"").decode())
        return ids
    finally:
        await bus.close()


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `tidings` child process on `settings`, with no OTEL_* of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TIDINGS_"))}
    env.update(
        TIDINGS_BUS=str(settings.bus),
        TIDINGS_NAMESPACE=settings.namespace,
        TIDINGS_HOME=settings.home,
        TIDINGS_STORE=settings.store_url,
    )
    env.update(extra)
    return env


@asynccontextmanager
async def tidings_run(args: list[str], env: dict[str, str], cwd: Path) -> AsyncIterator[Path]:
    """`tidings run ARGS` in a child process, from its "worker started"; yields its log file.

    Leaving the block stops it with SIGTERM, which must end it cleanly (exit 0).
    """
    log = cwd / "run.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tidings.cli", "run", *args, env=env, cwd=cwd, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await eventually(lambda: "worker started" in log.read_text(), timeout=60,
                         message="tidings run")  # fmt: skip
        yield log
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
