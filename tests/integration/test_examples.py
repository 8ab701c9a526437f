"""The bundled examples run and do what their docstrings say."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import eventually, running, settings_for, stored_counts


async def test_fraud_example_flags_and_notifies(
    bus_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXAMPLE_FEED_RATE", "1000")
    monkeypatch.setenv("EXAMPLE_FEED_COUNT", "400")
    from examples.fraud import app

    settings = settings_for(bus_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        stats = worker.stats()
        await eventually(
            lambda: stats["fraud-detector"].received + stats["notifier"].received >= 400,
            timeout=60,
            message="the feed",
        )

        async def notified_every_flag() -> bool:
            flags = await stored_counts(bus_url, namespace, "fraud.flagged")
            count = sum(flags.values())
            return count > 0 and stats["notifier"].handled == count

        await eventually(notified_every_flag, timeout=60, message="notifications")
        detector = stats["fraud-detector"]
        assert detector.filtered > detector.handled > 0  # most payments are small
        assert detector.dead_lettered == 0 and stats["notifier"].dead_lettered == 0
