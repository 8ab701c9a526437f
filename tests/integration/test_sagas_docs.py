"""docs/sagas.md runs as written, and examples/saga.py shows the compensation happen."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tidings.cli import cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "sagas.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


@pytest.fixture
def shop() -> Iterator[types.ModuleType]:
    """The page's first block, importable as ``shop`` (the testing section imports it)."""
    module = types.ModuleType("shop")
    exec(compile(blocks("python")[0], "<docs/sagas.md: app>", "exec"), module.__dict__)
    sys.modules["shop"] = module
    try:
        yield module
    finally:
        del sys.modules["shop"]


async def test_the_page_app_and_its_harness_test(shop: types.ModuleType) -> None:
    assert set(shop.app.sagas) == {"fulfilment"}
    namespace: dict[str, Any] = {}
    exec(compile(blocks("python")[1], "<docs/sagas.md: testing>", "exec"), namespace)
    await namespace["test_a_failed_shipment_is_undone_latest_first"]()


def test_the_pure_table_block() -> None:
    exec(compile(blocks("python")[2], "<docs/sagas.md: table>", "exec"), {})


def test_the_cli_block_names_real_commands() -> None:
    out = CliRunner().invoke(cli, ["saga", "--help"]).output
    commands = {line.split()[2] for line in blocks("sh")[0].splitlines() if line.strip()}
    assert commands == {"ls", "show", "retry", "cancel"}
    for command in commands:
        assert command in out


def test_the_example_prints_the_compensation_in_reverse_order() -> None:
    done = subprocess.run(
        [sys.executable, "examples/saga.py"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={"PATH": "/usr/bin:/bin", "SAGA_ORDERS": "3"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("order ")]
    failed = [line for line in lines if "-3 " in line]
    assert [line[len("order ") + 15 :] for line in failed] == [
        "reserved 3 item(s)",
        "charged 30.00",
        "shipment FAILED: the courier refused the parcel",
        f"  compensate: refunded 30.00 (ch_{failed[0].split()[1]})",
        "  compensate: released 3 item(s)",
        "saga fulfilment: compensated after shipment.failed: undid charge, then reserve",
    ]
    assert sum("saga fulfilment: completed" in line for line in lines) == 2
    assert "sagas: {'compensated': 1, 'completed': 2}" in done.stdout


async def test_saga_ls_at_80_columns_shows_each_status_and_its_steps(
    shop: types.ModuleType, tmp_path: Path
) -> None:
    # Before, six no-wrap columns (the whole id, the time) cut the status to "compen…"
    # and left no room for the steps done or the reason.
    from tidings.testing import harness

    url = f"sqlite:///{tmp_path / 'tidings.db'}"
    async with harness(shop.app, store=url) as t:
        await t.publish("order.placed", {"order_id": "o1"})
        await t.settle()
        (saga,) = await t.store.list_sagas("fulfilment")
    runner = CliRunner()
    out = await asyncio.to_thread(
        runner.invoke, cli, ["--store", url, "saga", "ls"], env={"COLUMNS": "80"}
    )
    assert out.exit_code == 0, out.output
    assert "compensated" in out.output and "(undone)" in out.output, out.output
    assert "shipment.failed" in out.output and saga.id[:13] in out.output
    shown = await asyncio.to_thread(
        runner.invoke, cli, ["--store", url, "saga", "show", saga.id[:13]]
    )
    assert shown.exit_code == 0 and saga.id in shown.output
