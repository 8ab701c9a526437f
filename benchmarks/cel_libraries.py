"""Which CEL library evaluates `where=` filters fastest? (How the runtime's choice was made.)

    python benchmarks/cel_libraries.py

Needs the candidates installed: pip install cel-expr-python common-expression-language cel-python
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

EXPRESSION = "data.amount > 1000 && data.currency == 'EUR'"
DATA = {"amount": 1500, "customer_id": "c1", "currency": "EUR"}
N = 50_000


def measure(evaluate: Callable[[], Any]) -> float:
    assert evaluate() is True
    started = time.perf_counter()
    for _ in range(N):
        evaluate()
    return N / (time.perf_counter() - started)


def candidates() -> dict[str, Callable[[], Any]]:
    found: dict[str, Callable[[], Any]] = {}
    try:
        from cel_expr_python import cel as google_cel

        env = google_cel.NewEnv(variables={"data": google_cel.Type.DYN})
        program = env.compile(EXPRESSION)
        found["cel-expr-python (Google C++ runtime)"] = lambda: program.eval(
            data={"data": DATA}
        ).plain_value()
    except ImportError:
        pass
    try:
        import cel as rust_cel

        compiled = rust_cel.compile(EXPRESSION)
        found["common-expression-language (Rust)"] = lambda: compiled.execute({"data": DATA})
    except ImportError:
        pass
    try:
        import celpy

        environment = celpy.Environment()
        runner = environment.program(environment.compile(EXPRESSION))
        activation = {"data": celpy.json_to_cel(DATA)}
        found["cel-python (pure Python)"] = lambda: bool(runner.evaluate(activation))
    except ImportError:
        pass
    return found


def main() -> None:
    table = Table(title=f"CEL evaluations per second: {EXPRESSION}")
    table.add_column("library")
    table.add_column("evals/s", justify="right")
    results = {name: measure(fn) for name, fn in candidates().items()}
    best = max(results.values())
    table.add_column("× best", justify="right")
    for name, rate in sorted(results.items(), key=lambda item: -item[1]):
        table.add_row(name, f"{rate:,.0f}", f"{rate / best:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
