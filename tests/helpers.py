"""Helpers for tests that run real workers: polling, settings, raw stream inspection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats

from tidings import App, Settings
from tidings.runtime.worker import Worker


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
