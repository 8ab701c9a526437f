"""Which JSON Schema validator checks event data fastest? (How tidings.schemas chose.)

    python benchmarks/validation.py [--n 5000] [--rounds 9]

One run measures every candidate on the same 10-field payload against the same schema
(the schema pydantic writes for the model below) and prints µs per validation, valid and
invalid. The target is at most 5 µs per event. The candidates come with `pip install -e
'.[dev]'`: jsonschema-rs (core), fastjsonschema, jsonschema, pydantic.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table


class Line(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class Order(BaseModel):
    order_id: str = Field(min_length=1)
    customer_id: str
    amount: float = Field(ge=0)
    currency: Literal["EUR", "USD", "GBP"]
    country: str = Field(pattern=r"^[A-Z]{2}$")
    express: bool = False
    note: str | None = None
    lines: list[Line]
    coupon: str | None = None
    attempt: int = 1


SCHEMA = Order.model_json_schema()
VALID: dict[str, Any] = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "amount": 99.5,
    "currency": "EUR",
    "country": "DE",
    "express": True,
    "note": None,
    "lines": [{"sku": "A-1", "qty": 2}],
    "coupon": "WELCOME",
    "attempt": 1,
}
INVALID = {**VALID, "lines": [{"sku": "A-1", "qty": 0}]}


def measure(check: Callable[[Any], object], data: Any, n: int) -> float:
    """µs per call over one round of `n` calls."""
    started = time.perf_counter()
    for _ in range(n):
        check(data)
    return (time.perf_counter() - started) / n * 1e6


def swallow(check: Callable[[Any], object], errors: tuple[type[Exception], ...]) -> Any:
    def run(data: Any) -> bool:
        try:
            check(data)
        except errors:
            return True
        return False

    return run


def candidates() -> dict[str, tuple[Callable[[Any], object], Callable[[Any], object]]]:
    """name -> (validate valid data, validate invalid data and build the error)."""
    found: dict[str, tuple[Callable[[Any], object], Callable[[Any], object]]] = {}
    from tidings.schemas import SchemaViolation, validator

    ours = validator(SCHEMA)
    found["tidings.schemas.validator (jsonschema-rs)"] = (ours, swallow(ours, (SchemaViolation,)))
    try:
        import jsonschema_rs

        rs = jsonschema_rs.validator_for(SCHEMA)
        found["jsonschema-rs is_valid"] = (rs.is_valid, lambda data: not rs.is_valid(data))
        found["jsonschema-rs validate"] = (
            rs.validate,
            swallow(rs.validate, (jsonschema_rs.ValidationError,)),
        )
    except ImportError:
        pass
    try:
        import fastjsonschema

        fast = fastjsonschema.compile(SCHEMA)
        found["fastjsonschema"] = (fast, swallow(fast, (fastjsonschema.JsonSchemaException,)))
    except ImportError:
        pass
    from pydantic import ValidationError

    found["pydantic model_validate"] = (
        Order.model_validate,
        swallow(Order.model_validate, (ValidationError,)),
    )
    try:
        import jsonschema

        slow = jsonschema.Draft202012Validator(SCHEMA)
        found["jsonschema validate"] = (
            slow.validate,
            swallow(slow.validate, (jsonschema.ValidationError,)),
        )
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    table = Table(title="JSON Schema validation of a 10-field payload, µs per validation")
    table.add_column("validator")
    table.add_column("valid µs", justify="right")
    table.add_column("invalid µs", justify="right")
    table.add_column("≤ 5 µs", justify="center")
    found = candidates()
    for name, (valid, invalid) in found.items():
        assert valid(VALID) is not False, f"{name} rejects the valid payload"
        assert invalid(INVALID) is True, f"{name} accepts the invalid payload"
    # Rounds interleave the candidates and each keeps its best round: other load on the
    # machine only ever slows a round down, and it then slows every candidate alike.
    best: dict[str, list[float]] = {name: [math.inf, math.inf] for name in found}
    for _ in range(args.rounds):
        for name, (valid, invalid) in found.items():
            n = args.n if "jsonschema validate" not in name else max(1, args.n // 50)
            best[name][0] = min(best[name][0], measure(valid, VALID, n))
            best[name][1] = min(best[name][1], measure(invalid, INVALID, n))
    for name, (ok, bad) in sorted(best.items(), key=lambda row: row[1][0]):
        table.add_row(name, f"{ok:.2f}", f"{bad:.2f}", "yes" if ok <= 5 else "no")
    Console().print(table)


if __name__ == "__main__":
    main()
