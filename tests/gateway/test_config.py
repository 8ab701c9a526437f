"""GatewayConfig from tidings.toml and the environment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tidings.errors import ConfigError
from tidings.gateway import GatewayConfig


def test_toml_tables_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text(
        """
[gateway]
jwt_secret = "from-toml"
max_body = 2048
allowed_origins = ["https://app.example.com"]

[gateway.api_keys.ops]
key = "plain-key"
user = "ops"
scopes = ["admin"]

[gateway.webhooks.github]
scheme = "github"
secrets = ["s1", "s2"]
type_header = "X-GitHub-Event"
type_prefix = "github."
"""
    )
    monkeypatch.setenv("TIDINGS_GATEWAY_JWT_SECRET", "from-env")
    monkeypatch.setenv("TIDINGS_GATEWAY_CLIENT_QUEUE", "7")
    config = GatewayConfig.load(toml)
    assert config.jwt_secret == "from-env" and config.max_body == 2048
    assert config.client_queue == 7
    assert config.allowed_origins == ("https://app.example.com",)
    (key,) = config.api_keys
    assert key.sha256 == hashlib.sha256(b"plain-key").hexdigest()
    assert key.user == "ops" and key.scopes == ("admin",)
    assert config.webhooks["github"].secrets == ("s1", "s2")


@pytest.mark.parametrize(
    "table",
    [
        "[gateway]\nunknown = 1",
        "[gateway]\nmax_body = 'lots'",
        "[gateway.webhooks.x]\nsecrets = ['s']\nscheme = 'svix'\ntype = 'a.b'",
        "[gateway.webhooks.x]\nsecrets = []\ntype = 'a.b'",
        "[gateway.webhooks.x]\nsecrets = ['s']",
        "[gateway.api_keys.x]\nuser = 'no-key'",
    ],
)
def test_bad_configuration_names_the_problem(tmp_path: Path, table: str) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text(table)
    with pytest.raises(ConfigError):
        GatewayConfig.load(toml)


def test_the_api_documents_are_off_unless_switched_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert GatewayConfig.load(tmp_path / "none.toml").openapi is False
    monkeypatch.setenv("TIDINGS_GATEWAY_OPENAPI", "1")
    assert GatewayConfig.load(tmp_path / "none.toml").openapi is True
    monkeypatch.setenv("TIDINGS_GATEWAY_OPENAPI", "off")
    assert GatewayConfig.load(tmp_path / "none.toml").openapi is False
    monkeypatch.setenv("TIDINGS_GATEWAY_OPENAPI", "maybe")
    with pytest.raises(ConfigError, match="openapi"):
        GatewayConfig.load(tmp_path / "none.toml")
