"""Validating event data against its JSON Schema, compiled once per schema.

jsonschema-rs was chosen by measuring (benchmarks/validation.py, a 10-field payload, one
run): about 1 µs per valid event, against about 3 µs for pydantic, 10 µs for
fastjsonschema and 150 µs for jsonschema on the same machine. Valid data, the common case,
costs one call into Rust; only invalid data pays for building the error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jsonschema_rs
import orjson

from tidings.errors import ConfigError, SchemaViolation

__all__ = ["SchemaViolation", "compiled", "pointer", "validator"]


def pointer(parts: Any) -> str:
    """A JSON pointer (RFC 6901) from path parts: ["items", 0, "sku"] -> "/items/0/sku"."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def validator(schema: Mapping[str, Any] | bool) -> Callable[[Any], None]:
    """Compile `schema` once; the function returned raises `SchemaViolation` on bad data.

    Formats (`date-time`, `email`, `uuid`, ...) are checked, as pydantic checks them.
    Python values JSON has no type for (datetime, UUID, Decimal) are compared in the form
    they take on the wire.
    """
    check = compiled(schema).validate

    def validate(data: Any) -> None:
        try:
            check(data)
        except jsonschema_rs.ValidationError as error:
            raise _violation(error) from None
        except ValueError:  # "Unsupported type": a value that orjson writes as JSON
            try:
                wire = orjson.loads(orjson.dumps(data))
            except orjson.JSONEncodeError as e:  # a set, an object, a dict holding itself
                raise SchemaViolation("", "type", f"the data is not JSON ({e})") from None
            try:
                check(wire)
            except jsonschema_rs.ValidationError as error:
                raise _violation(error) from None

    return validate


def compiled(schema: Mapping[str, Any] | bool) -> Any:
    """`schema` compiled by jsonschema-rs, or ConfigError naming what makes it unusable.

    References are followed inside the schema only (`#/$defs/Name`): nothing is fetched,
    so validating never waits on the network and means the same everywhere.
    """
    try:
        return jsonschema_rs.validator_for(
            schema if isinstance(schema, bool) else dict(schema),
            validate_formats=True,
            retriever=_no_fetching,
        )
    except ValueError as e:  # jsonschema_rs.ValidationError: the schema breaks the meta-schema
        where = pointer(getattr(e, "instance_path", []))
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"not a usable JSON Schema{f' at {where}' if where else ''}: {first}; fix the "
            "schema (a pydantic model's model_json_schema() always is one), and keep every "
            "$ref inside it, under $defs"
        ) from e


def _no_fetching(uri: str) -> Any:
    raise ValueError(f"{uri} lies outside the schema and is not fetched")


def _violation(error: jsonschema_rs.ValidationError) -> SchemaViolation:
    keywords = [part for part in error.schema_path if isinstance(part, str)]
    rule = keywords[-1] if keywords else "schema"
    return SchemaViolation(pointer(error.instance_path), rule, _short(error))


_SHOWN = 100  # characters of an offending value a message quotes, at each end


def _short(error: jsonschema_rs.ValidationError) -> str:
    """The validator's message, the offending value in it cut to its first characters.

    It quotes the whole value: a megabyte string makes a megabyte message, in the dead
    letter, the log line and the gateway's answer.
    """
    message: str = error.message
    if len(message) <= 3 * _SHOWN:
        return message
    try:
        quoted = orjson.dumps(error.instance).decode()
    except (TypeError, ValueError):  # a value orjson does not write (an int past 64 bits)
        quoted = ""
    if quoted and message.startswith(quoted):
        return f"{quoted[:_SHOWN]}…{message[len(quoted) :][: 2 * _SHOWN]}"
    return f"{message[:_SHOWN]}…{message[-_SHOWN:]}"
