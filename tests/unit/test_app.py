from __future__ import annotations

from pathlib import Path

import pytest

from tidings import App, ConfigError, Context, Event, Settings


def test_agent_declaration_keeps_what_was_declared() -> None:
    app = App("shop", settings=Settings())

    @app.agent(
        "fraud",
        on="payment.*",
        where="data.amount > 10",
        key="data.customer_id",
        emits=["fraud.flagged"],
        max_attempts=3,
    )
    async def fraud(event: Event, ctx: Context) -> None:
        """Flags big payments."""

    spec = app.agents["fraud"]
    assert spec.patterns == ("payment.*",)
    assert spec.emits == ("fraud.flagged",)
    assert spec.max_attempts == 3
    assert spec.description == "Flags big payments."
    assert len(spec.version) == 12
    assert spec.key_of(Event.create("payment.x", {"customer_id": 42})) == "42"
    assert spec.key_of(Event.create("payment.x", {})) == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on": "a..b"}, "pattern"),
        ({"on": []}, "at least one"),
        ({"on": "a", "where": "data.x >"}, "not valid CEL"),
        ({"on": "a", "max_attempts": 0}, ">= 1"),
    ],
)
def test_bad_declarations_fail_early_with_the_fix(kwargs: dict[str, object], message: str) -> None:
    app = App("shop", settings=Settings())
    with pytest.raises(Exception, match=message):
        app.agent("a", **kwargs)  # type: ignore[arg-type]


def test_handlers_must_be_async_and_names_unique() -> None:
    app = App("shop", settings=Settings())
    with pytest.raises(ConfigError, match="async def"):
        app.agent("a", on="x")(lambda e, c: None)  # type: ignore[arg-type,return-value]

    async def handler(event: Event, ctx: Context) -> None: ...

    app.agent("a", on="x")(handler)
    with pytest.raises(ConfigError, match="twice"):
        app.agent("a", on="x")(handler)


def test_settings_layering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text('[tidings]\nnamespace = "fromtoml"\nack_wait = 5\nstore = "sqlite:///x.db"\n')
    monkeypatch.setenv("TIDINGS_ACK_WAIT", "7.5")
    settings = Settings.load(toml, home=str(tmp_path / "h"))
    assert settings.namespace == "fromtoml"
    assert settings.ack_wait == 7.5
    assert settings.store_url == "sqlite:///x.db"
    assert settings.home_path == tmp_path / "h"
    assert Settings.load(tmp_path / "missing.toml").bus is None


def test_settings_errors_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_ACK_WAIT", "soon")
    with pytest.raises(ConfigError, match="ack_wait"):
        Settings.load(tmp_path / "none.toml")
    monkeypatch.delenv("TIDINGS_ACK_WAIT")
    toml = tmp_path / "tidings.toml"
    toml.write_text("[tidings]\nbsu = 'nats://x'\n")
    with pytest.raises(ConfigError, match="unknown setting 'bsu'"):
        Settings.load(toml)
