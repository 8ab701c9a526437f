"""An AsyncAPI 3.0 document of an app: which events each agent receives and sends, and tools.

One channel per event type or pattern (its address is the type, as on the bus), one
`receive` operation per consumed pattern and one `send` operation per declared `emits`
entry of each agent. Payload schemas come from the declared event types (`@app.event`),
one message per version, its ``ce-dataschema`` naming it; for an undeclared type, from the
agents' `data_model` (pydantic). The CloudEvents attributes travel as ``ce-*`` headers
(binary content mode). Each tool of
``app.tools`` is a request/reply operation: calls on ``tool.invoke.<tool>``, replies on
the calling agent's ``tool.result.{agent}``.
"""

from __future__ import annotations

import re
from typing import Any

from tidings.app import App
from tidings.events import ATTRIBUTES
from tidings.schemas.registry import EventVersion
from tidings.tools import RESULT, invoke_type

_HEADERS = {
    "type": "object",
    "description": "CloudEvents 1.0 attributes in binary content mode (one ce- header each).",
    "properties": {f"ce-{name}": {"type": "string"} for name in ATTRIBUTES},
    "required": ["ce-id", "ce-source", "ce-type", "ce-specversion"],
}


def build(app: App, *, server: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of `app` as a JSON-ready dict."""
    doc = _Document(app)
    for event_type in app.schemas.types():
        doc.declared(event_type, app.schemas.versions(event_type))
    for spec in app.agents.values():
        model = _schema_of(doc, spec.data_model) if spec.data_model is not None else None
        for pattern in spec.patterns:
            channel = doc.channel(pattern, model)
            doc.operation(f"{spec.name}.receive.{pattern}", "receive", channel, spec.description)
        for pattern in spec.emits or ():
            channel = doc.channel(pattern, None)
            doc.operation(f"{spec.name}.send.{pattern}", "send", channel, spec.description)
    for name, tool in app.tools.items():
        request = doc.channel(invoke_type(name), dict(tool.input_schema))
        op = doc.operation(f"tool.{name}", "receive", request, tool.description)
        op["reply"] = doc.reply(name, dict(tool.output_schema))
    out = doc.out
    if server:
        scheme, _, host = server.partition("://")
        out["servers"] = {"bus": {"host": host or scheme, "protocol": scheme if host else "nats"}}
    return out


class _Document:
    def __init__(self, app: App) -> None:
        self.out: dict[str, Any] = {
            "asyncapi": "3.0.0",
            "info": {
                "title": app.name,
                "version": "1.0.0",
                "description": f"Events the agents of {app.name!r} receive and send.",
            },
            "defaultContentType": "application/json",
            "channels": {},
            "operations": {},
            "components": {"schemas": {"CloudEventHeaders": _HEADERS}},
        }
        self._ids: dict[str, str] = {}
        self._declared: set[str] = set()  # channels whose messages are the declared versions

    def _id(self, name: str) -> str:
        if name not in self._ids:
            base = re.sub(r"[^A-Za-z0-9_-]", "_", name.replace("*", "STAR").replace(">", "REST"))
            candidate, n = base, 1
            while candidate in self._ids.values():
                n += 1
                candidate = f"{base}-{n}"
            self._ids[name] = candidate
        return self._ids[name]

    def declared(self, event_type: str, versions: list[EventVersion]) -> str:
        """The channel of a declared type: one message per version, oldest first."""
        cid = self._id(event_type)
        self._declared.add(cid)
        messages: dict[str, Any] = {}
        for declared in versions:
            mid = f"{cid}-v{declared.version}"
            messages[mid] = {
                "name": event_type,
                "title": f"{event_type} version {declared.version}",
                "summary": f"ce-dataschema: {declared.dataschema}",
                "contentType": "application/json",
                "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
                "payload": self._payload(declared),
            }
        self.out["channels"][cid] = {"address": event_type, "messages": messages}
        return cid

    def _payload(self, declared: EventVersion) -> dict[str, Any]:
        if declared.model is not None:
            return _schema_of(self, declared.model)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{declared.event_type}.v{declared.version}")
        self.out["components"]["schemas"][name] = _rebased(
            declared.schema, f"#/components/schemas/{name}/"
        )
        return {"$ref": f"#/components/schemas/{name}"}

    def channel(self, address: str, payload: dict[str, Any] | None) -> str:
        """The id of the channel for `address`, created on first use."""
        cid = self._id(address)
        channels = self.out["channels"]
        if cid in self._declared:  # its payloads are the declared versions'
            return cid
        if cid not in channels:
            channels[cid] = {
                "address": address,
                "messages": {
                    cid: {
                        "name": address,
                        "contentType": "application/json",
                        "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
                        "payload": payload or {},
                    }
                },
            }
        elif payload:
            channels[cid]["messages"][cid]["payload"] = payload
        return cid

    def reply(self, tool: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A tool's reply: a message on the caller's channel ``tool.result.{agent}``."""
        address = f"{RESULT}.{{agent}}"
        cid = self._id(address)
        channel = self.out["channels"].setdefault(
            cid,
            {
                "address": address,
                "parameters": {"agent": {"description": "the agent that called the tool"}},
                "messages": {},
            },
        )
        mid = self._id(f"{RESULT}.{tool}")
        channel["messages"][mid] = {
            "name": f"{tool} result",
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
            "payload": payload,
        }
        return {
            "channel": {"$ref": f"#/channels/{cid}"},
            "messages": [{"$ref": f"#/channels/{cid}/messages/{mid}"}],
        }

    def operation(self, name: str, action: str, channel: str, summary: str) -> dict[str, Any]:
        messages = self.out["channels"][channel]["messages"]
        op: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{mid}"} for mid in messages],
        }
        if summary:
            op["summary"] = summary
        self.out["operations"][self._id(name)] = op
        return op


def _schema_of(doc: _Document, model: type[Any]) -> dict[str, Any]:
    """A pydantic model's JSON Schema, its definitions moved to components.schemas."""
    schema = dict(model.model_json_schema(ref_template="#/components/schemas/{model}"))
    schemas = doc.out["components"]["schemas"]
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with its local references (``#/$defs/...``) pointing under `base`."""
    if isinstance(schema, dict):
        return {
            k: (base + v[2:] if k == "$ref" and isinstance(v, str) and v.startswith("#/") else
                _rebased(v, base))
            for k, v in schema.items()
        }  # fmt: skip
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    return schema
