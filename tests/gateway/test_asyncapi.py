"""The AsyncAPI 3.0 document, validated against the official AsyncAPI JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from tidings import App, Context, Event
from tidings.gateway.asyncapi import build

SCHEMA = json.loads((Path(__file__).parent / "asyncapi-3.0.0.schema.json").read_text())


class Money(BaseModel):
    amount: float
    currency: str = "EUR"


class Payment(BaseModel):
    customer_id: str
    total: Money
    tags: list[str] = []
    note: str | None = None


def described_app(with_tools: bool) -> App:
    app = App("described")

    @app.agent(
        "scorer",
        on="payment.*.created",
        emits=["fraud.flagged", "fraud.cleared"],
        data_model=Payment,
    )
    async def scorer(event: Event, ctx: Context) -> None:
        """Scores payments for fraud."""

    @app.agent("auditor", on=["fraud.>", "payment.>"])
    async def auditor(event: Event, ctx: Context) -> None:
        """Keeps an audit trail."""

    if with_tools:

        @app.tool("risk.score", description="Score a payment's risk.")
        async def risk_score(amount: float) -> float:
            return amount / 1000

    return app


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


@pytest.mark.parametrize("with_tools", [False, True], ids=["agents", "agents+tools"])
def test_the_document_is_valid_asyncapi_3(with_tools: bool) -> None:
    doc = build(described_app(with_tools), server="nats://127.0.0.1:4222")
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    for ref in refs(doc):
        resolve(doc, ref)  # every reference points somewhere
    ops = doc["operations"]
    receive = {k for k, v in ops.items() if v["action"] == "receive"}
    send = {k for k, v in ops.items() if v["action"] == "send"}
    assert "scorer_receive_payment_STAR_created" in receive
    assert {"scorer_send_fraud_flagged", "scorer_send_fraud_cleared"} <= send
    assert {"auditor_receive_fraud_REST", "auditor_receive_payment_REST"} <= receive
    channel = doc["channels"]["payment_STAR_created"]
    assert channel["address"] == "payment.*.created"
    payload = channel["messages"]["payment_STAR_created"]["payload"]
    assert resolve(doc, payload["$ref"])["required"] == ["customer_id", "total"]
    assert "Money" in doc["components"]["schemas"]
    if with_tools:
        tool = ops["tool_risk_score"]
        assert tool["channel"] == {"$ref": "#/channels/tool_invoke_risk_score"}
        assert doc["channels"]["tool_invoke_risk_score"]["address"] == "tool.invoke.risk.score"
        request = doc["channels"]["tool_invoke_risk_score"]["messages"]["tool_invoke_risk_score"]
        assert request["payload"]["properties"]["amount"]["type"] == "number"
        reply = tool["reply"]["channel"]["$ref"].removeprefix("#/channels/")
        assert doc["channels"][reply]["address"] == "tool.result.{agent}"


def test_an_invalid_document_is_caught_by_the_schema() -> None:
    doc = build(described_app(False))
    doc["operations"]["scorer_send_fraud_flagged"]["action"] = "publish"  # AsyncAPI 2 wording
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA).validate(doc)


def test_the_cli_prints_the_document(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    subprocess.run(
        [sys.executable, "-m", "tidings.cli", "asyncapi", "examples.fraud:app", "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    doc = json.loads(out.read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    assert doc["info"]["title"] == "shop"
