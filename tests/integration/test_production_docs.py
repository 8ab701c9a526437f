"""docs/production.md: its code runs as written, its settings are real settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, settings_for
from tidings import App, Settings
from tidings.client import Client
from tidings.store import open_store
from tidings.worker import Worker

pytestmark = pytest.mark.nats

PAGE = Path(__file__).resolve().parents[2] / "docs" / "production.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_pages_settings_are_settings(tmp_path: Path) -> None:
    (table,) = [tomllib.loads(b)["tidings"] for b in blocks("toml")]
    path = tmp_path / "tidings.toml"
    path.write_text(blocks("toml")[0])
    settings = Settings.load(path)
    assert (settings.replicas, settings.partitions) == (3, 16)
    assert set(table) <= {f for f in Settings.__dataclass_fields__}


async def test_the_pages_ledger_keeps_each_customer_in_order_over_two_workers(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    code: dict[str, Any] = {"__name__": "docs_production"}
    exec(compile(blocks("python")[0], str(PAGE), "exec"), code)
    app, pay = code["app"], code["pay"]
    assert isinstance(app, App)
    settings = settings_for(nats_url, namespace, tmp_path, partitions=16, lease_ttl=2.0)
    first, second = Worker(app, settings), Worker(app, settings)
    await first.start()
    try:
        await second.start()
        try:
            async with Client(settings) as client:
                for n in range(60):
                    await pay(client, f"c{n % 6}", n)
            store = open_store(settings.store_url)
            await store.open()
            try:

                async def balances() -> dict[str, int]:
                    return {
                        f"c{c}": (await store.load_state("ledger", f"c{c}")).values.get(
                            "balance", 0
                        )
                        for c in range(6)
                    }

                expected = {f"c{c}": sum(range(c, 60, 6)) for c in range(6)}
                await eventually(lambda: _same(balances, expected), message="balances")
            finally:
                await store.close()
        finally:
            await second.stop(grace=5)
    finally:
        await first.stop(grace=5)


async def _same(read: Any, expected: dict[str, int]) -> bool:
    return bool(await read() == expected)
