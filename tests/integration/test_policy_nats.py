"""`tidings policy export --nats` on a real nats-server: the broker refuses a denied publish."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from typer.testing import CliRunner

from tests.conftest import free_port, nats_server_binary
from tidings import App, Context, Event
from tidings.cli import cli
from tidings.policy import to_nats

pytestmark = pytest.mark.nats

APP = """
from tidings import App, Context, Event

app = App("shop")
app.policy.agent("billing", tools=["card.charge"])


@app.agent("billing", on="order.placed", emits=["order.paid"])
async def billing(event: Event, ctx: Context) -> None:
    await ctx.emit("order.paid", event.data)
"""


def shop() -> App:
    app = App("shop")
    app.policy.agent("billing", tools=["card.charge"])

    @app.agent("billing", on="order.placed", emits=["order.paid"])
    async def billing(event: Event, ctx: Context) -> None:
        await ctx.emit("order.paid", event.data)

    return app


def test_policy_show_and_export_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(cli, ["policy", "show", "shopapp:app"])
    assert shown.exit_code == 0, shown.output
    assert "billing" in shown.output and "card.charge" in shown.output
    as_json = runner.invoke(cli, ["policy", "show", "shopapp:app", "--json"])
    assert '"emits": [' in as_json.output
    out = tmp_path / "policy.conf"
    exported = runner.invoke(
        cli, ["policy", "export", "shopapp:app", "--nats", "--namespace", "shop", "-o", str(out)]
    )
    assert exported.exit_code == 0, exported.output
    assert '"shop.events.order.paid"' in out.read_text()
    assert runner.invoke(cli, ["policy", "export", "shopapp:app"]).exit_code == 1  # --nats


async def test_the_broker_refuses_what_the_policy_denies(tmp_path: Path) -> None:
    app = shop()
    conf = to_nats(app.rules(), "shop", {"billing": ["order.placed"]},
                   passwords={"billing": "s3cret"})  # fmt: skip
    (tmp_path / "policy.conf").write_text(conf)
    port = free_port()
    (tmp_path / "server.conf").write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        'include "policy.conf"\n'
    )
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [nats_server_binary(), "-c", str(tmp_path / "server.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    try:
        nc = None
        for _ in range(100):
            try:
                nc = await nats.connect(f"nats://billing:s3cret@127.0.0.1:{port}",
                                        error_cb=on_error, allow_reconnect=False)  # fmt: skip
                break
            except Exception:
                await asyncio.sleep(0.05)
        assert nc is not None, "nats-server did not start with the exported config"
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="SHOP_EVENTS", subjects=["shop.events.>"]))
            ack = await js.publish("shop.events.order.paid", b"{}")
            assert ack.seq == 1
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish("shop.events.order.shipped", b"{}", timeout=0.5)
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish("shop.events.tool.invoke.mail.send", b"{}", timeout=0.5)
            await js.publish("shop.events.tool.invoke.card.charge", b"{}")
            info = await js.stream_info("SHOP_EVENTS")
            assert info.state.last_seq == 2  # the allowed emit and the allowed tool call
            assert any("order.shipped" in e for e in errors), errors
        finally:
            await nc.close()
    finally:
        server.terminate()
        server.wait(10)


def test_policy_show_names_every_type_that_moves_to_a_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "paying.py").write_text(
        "from tidings import App\n"
        "app = App('shop')\n"
        "app.policy.entity('order', key='data.order_id',\n"
        "    states={'order.placed': 'placed', 'order.paid': 'paid', 'card.captured': 'paid'},\n"
        "    transitions={'placed': ['paid']})\n"
    )
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(cli, ["policy", "show", "paying:app"], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    assert "order.paid, card.captured" in shown.output
