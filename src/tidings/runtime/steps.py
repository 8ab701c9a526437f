"""Durable steps: the journal that makes a re-run handler skip work it already paid for.

Every `ctx.llm.complete`, `ctx.tool`, `ctx.step` and `ctx.ask` of one handler run is a
numbered step (seq 0, 1, 2, ...). Before a step runs, the journal of (agent, event id)
is consulted: a step recorded as done returns its recorded result at once, a recorded
failure raises the same error again, and a tool call or question still pending is
awaited instead of sent again. A step that runs is recorded as soon as it completes, so
a crash between two steps loses at most the step in progress.

The rule this relies on (the determinism rule): between steps, a handler takes the same
path on every run, deciding only from the event, `ctx.state` and earlier step results.
A re-run whose step N has another kind, name or arguments than the journal's step N
raises `DeterminismError`, which dead-letters the event instead of mixing two runs.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from tidings.errors import (
    ApprovalTimeout,
    DeterminismError,
    ToolError,
    ToolFailed,
    ToolNotServed,
    ToolTimeout,
)
from tidings.store.base import Store
from tidings.store.records import Step

_NAMESPACE = uuid.UUID("6f1c2d1e-5a0b-4c51-9d0e-7469646e6773")

# Failures a replay raises again, by the name journaled with them.
_REPLAYED_ERRORS: dict[str, type[Exception]] = {
    "ToolNotServed": ToolNotServed,
    "ToolTimeout": ToolTimeout,
    "ApprovalTimeout": ApprovalTimeout,
}


def derived_id(*parts: object) -> str:
    """A UUID that is the same for the same parts: ids a re-run must reproduce."""
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def args_hash(*values: Any) -> str:
    """A short hash of a step's arguments, to notice a re-run that asks something else."""
    raw = orjson.dumps(values, option=orjson.OPT_SORT_KEYS, default=repr)
    return hashlib.sha256(raw).hexdigest()[:16]


def error_detail(exc: Exception) -> dict[str, Any]:
    """What the journal keeps of a step's failure, so a replay can raise it again."""
    detail: dict[str, Any] = {"error_type": type(exc).__name__, "error": str(exc)}
    if isinstance(exc, ToolError):
        detail["tool"] = exc.tool
    if isinstance(exc, ToolFailed):
        detail["tool_error"] = exc.error
    return detail


def replayed_error(step: Step) -> Exception:
    """The exception a failed step raised when it ran, rebuilt from the journal."""
    detail = step.detail
    kind = detail.get("error_type", "")
    if kind == "ToolFailed":
        return ToolFailed(detail.get("tool", step.name), detail.get("tool_error", ""))
    cls = _REPLAYED_ERRORS.get(kind)
    if cls is not None and issubclass(cls, ToolError):
        return cls(detail.get("tool", step.name), detail.get("error", ""))
    if cls is not None:
        return cls(detail.get("error", ""))
    return StepFailed(f"step {step.seq} ({step.kind} {step.name!r}) failed: {detail}")


class StepFailed(Exception):
    """A journaled `ctx.step` raised; replays raise this with its message."""


@dataclass(slots=True)
class Journal:
    """The steps of one handler run: what was recorded before, and what this run did."""

    store: Store
    agent: str
    event_id: str
    recorded: dict[int, Step] | None = None  # by seq; a step that raised leaves a gap
    seq: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    async def begin(self, kind: str, name: str, digest: str) -> tuple[int, Step | None]:
        """Take the next seq; return the journaled step there, checking it is the same step."""
        if self.recorded is None:
            steps = await self.store.load_journal(self.agent, self.event_id)
            self.recorded = {step.seq: step for step in steps}
        seq, self.seq = self.seq, self.seq + 1
        step = self.recorded.get(seq)
        if step is None:
            return seq, None
        if (step.kind, step.name, step.args_hash) != (kind, name, digest):
            raise DeterminismError(
                f"agent {self.agent!r} event {self.event_id}: step {seq} is now"
                f" {kind} {name!r} (args {digest}) but the journal recorded {step.kind}"
                f" {step.name!r} (args {step.args_hash}); between steps a handler must decide"
                " only from the event, ctx.state and earlier step results (see docs/steps.md)"
            )
        return seq, step

    async def save(self, step: Step) -> None:
        """Record a step durably and remember it for the rest of this run."""
        await self.store.save_step(step)
        assert self.recorded is not None
        self.recorded[step.seq] = step

    def note(self, step: Step, started: float, *, replayed: bool, **extra: Any) -> None:
        """Add a step to the decision record."""
        record: dict[str, Any] = {
            "seq": step.seq,
            "kind": step.kind,
            "name": step.name,
            "status": step.status,
            "replayed": replayed,
            "ms": round((time.perf_counter() - started) * 1000, 3),
            **step.detail,
            **extra,
        }
        record.setdefault("result", step.result)
        self.records.append(record)

    def check_complete(self) -> None:
        """A run that ends before the journaled steps did took another path: refuse it."""
        later = [seq for seq in self.recorded or {} if seq >= self.seq]
        if later:
            assert self.recorded is not None
            missing = self.recorded[min(later)]
            raise DeterminismError(
                f"agent {self.agent!r} event {self.event_id}: the handler returned after"
                f" {self.seq} steps but the journal holds step {missing.seq} (next:"
                f" {missing.kind} {missing.name!r}); between steps a handler must decide only"
                " from the event, ctx.state and earlier step results (see docs/steps.md)"
            )

    def usage(self) -> tuple[str | None, int, int, float]:
        """(last model, tokens in, tokens out, cost) over the LLM steps, for the decision."""
        model, tokens_in, tokens_out, cost = None, 0, 0, 0.0
        for record in self.records:
            if record["kind"] == "llm":
                model = record.get("model") or model
                tokens_in += int(record.get("tokens_in", 0))
                tokens_out += int(record.get("tokens_out", 0))
                cost += float(record.get("cost", 0.0))
        return model, tokens_in, tokens_out, round(cost, 8)
