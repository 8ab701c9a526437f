"""What a replay found, decision by decision, as plain values: the diff and its JSON.

Pure: no I/O. A decision's *outcome* is what it did (status, result, emitted events with
their data, tool calls, steps, its state change) plus what it asked models; two outcomes
are compared field by field, and only the effects decide the verdict:

    same      the same effects (the model may have worded its answers differently)
    changed   some effect differs: `changes` lists each field path, old and new
    new       the new code decided on an event the recorded code did not (or filtered)
    missing   the recorded code decided on it, the new code filters it out
    blocked   the new code made a call a shadow replay may not make (docs/replay.md)

JSON is canonical (sorted keys, no timings, no fresh ids), so two replays of the same
window with the same code give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Verdict = Literal["same", "changed", "new", "missing", "blocked"]
VERDICTS: tuple[Verdict, ...] = ("same", "changed", "new", "missing", "blocked")
EFFECTS = ("status", "result", "emitted", "tool_calls", "steps", "state_change", "error")


@dataclass(slots=True)
class Outcome:
    """What one run of an agent on one event did, in a form two runs can be compared in."""

    status: str
    result: Any = None
    emitted: list[dict[str, Any]] = field(default_factory=list)  # {"type", "data"}
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "args", "result"}
    steps: list[dict[str, Any]] = field(default_factory=list)  # ctx.step / ctx.ask
    state_change: dict[str, Any] = field(default_factory=dict)  # {"set": {}, "deleted": []}
    llm: list[dict[str, Any]] = field(default_factory=list)  # {"model", "messages", "answer"}
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    error: str | None = None
    version: str = ""

    def effects(self) -> dict[str, Any]:
        """The fields the verdict is decided on."""
        return {name: getattr(self, name) for name in EFFECTS}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            **self.effects(), "llm": self.llm, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "cost": round(self.cost, 8), "version": self.version,
        }  # fmt: skip


def state_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The keys a run set (to their new values) and deleted, from state before and after."""
    changed = {k: v for k, v in sorted(after.items()) if k not in before or before[k] != v}
    return {"set": changed, "deleted": sorted(k for k in before if k not in after)}


@dataclass(slots=True)
class Change:
    """One field that differs: its path (``emitted[0].data.score``), old and new value."""

    path: str
    old: Any
    new: Any

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; an absent side is ``{"absent": true}``."""
        return {"path": self.path, "old": _side(self.old), "new": _side(self.new)}


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


def _side(value: Any) -> Any:
    return {"absent": True} if value is ABSENT else value


def diff(old: Any, new: Any, path: str = "") -> list[Change]:
    """Every leaf that differs between two JSON values, by field path, in a stable order.

    Types count: ``1`` and ``1.0`` and ``True`` differ, as they do on the wire.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Change] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += diff(old.get(key, ABSENT), new.get(key, ABSENT), sub)
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else ABSENT
            b = new[i] if i < len(new) else ABSENT
            out += diff(a, b, f"{path}[{i}]")
        return out
    if type(old) is not type(new) or old != new:
        return [Change(path, old, new)]
    return []


@dataclass(slots=True)
class DecisionDiff:
    """One triggering event: what was recorded, what the new code did, and the verdict."""

    agent: str
    event_id: str
    event_type: str
    key: str | None
    verdict: Verdict
    old: Outcome | None
    new: Outcome | None
    changes: list[Change] = field(default_factory=list)
    would_call: list[dict[str, Any]] = field(default_factory=list)  # {"tool", "args", "stand_in"}
    blocked: str | None = None  # why, when the verdict is "blocked"

    @property
    def llm_pairs(self) -> list[dict[str, Any]]:
        """The old and new model calls side by side, by position."""
        old = self.old.llm if self.old else []
        new = self.new.llm if self.new else []
        return [
            {"old": old[i] if i < len(old) else None, "new": new[i] if i < len(new) else None}
            for i in range(max(len(old), len(new)))
        ]

    def deltas(self) -> dict[str, Any]:
        """Tokens and cost of the new run minus the recorded one's."""
        o, n = self.old, self.new
        return {
            "tokens_in": (n.tokens_in if n else 0) - (o.tokens_in if o else 0),
            "tokens_out": (n.tokens_out if n else 0) - (o.tokens_out if o else 0),
            "cost": round((n.cost if n else 0.0) - (o.cost if o else 0.0), 8),
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "agent": self.agent, "event_id": self.event_id, "event_type": self.event_type,
            "key": self.key, "verdict": self.verdict,
            "changes": [c.to_json() for c in self.changes],
            "old": self.old.to_json() if self.old else None,
            "new": self.new.to_json() if self.new else None,
            "llm": self.llm_pairs, "deltas": self.deltas(), "would_call": self.would_call,
            "blocked": self.blocked,
        }  # fmt: skip


def judge(
    agent: str,
    event_id: str,
    event_type: str,
    key: str | None,
    old: Outcome | None,
    new: Outcome | None,
    *,
    would_call: list[dict[str, Any]] | None = None,
    blocked: str | None = None,
) -> DecisionDiff:
    """The verdict on one event from its recorded and its new outcome (None: no decision)."""
    calls = would_call or []
    if blocked is not None:
        changes = diff(old.effects(), new.effects()) if old and new else []
        return DecisionDiff(agent, event_id, event_type, key, "blocked", old, new, changes,
                            calls, blocked)  # fmt: skip
    if old is None and new is None:
        raise ValueError("an event no run decided on has no verdict")
    if old is None:
        return DecisionDiff(agent, event_id, event_type, key, "new", None, new, [], calls)
    if new is None:
        return DecisionDiff(agent, event_id, event_type, key, "missing", old, None, [], calls)
    changes = diff(old.effects(), new.effects())
    verdict: Verdict = "changed" if changes else "same"
    return DecisionDiff(agent, event_id, event_type, key, verdict, old, new, changes, calls)


@dataclass(slots=True)
class Report:
    """A whole replay: the window, the code and model, every decision's verdict, totals."""

    agent: str
    since: str
    until: str
    version_new: str
    model: str | None
    reuse_llm: bool
    decisions: list[DecisionDiff] = field(default_factory=list)
    scanned: int = 0  # events read from the bus in the window
    ended: str = ""  # why reading the bus stopped (not in the JSON: it depends on later events)
    notes: list[str] = field(default_factory=list)
    # Model calls the replay made for real (not answered from the journal), and their cost.
    llm_calls: int = 0
    llm_cost: float = 0.0

    def counts(self) -> dict[str, int]:
        """How many decisions got each verdict."""
        out: dict[str, int] = dict.fromkeys(VERDICTS, 0)
        for d in self.decisions:
            out[d.verdict] += 1
        return out

    def per_agent(self) -> dict[str, dict[str, int]]:
        """The verdict counts of each agent (one today; the shape holds several)."""
        out: dict[str, dict[str, int]] = {}
        for d in self.decisions:
            out.setdefault(d.agent, dict.fromkeys(VERDICTS, 0))[d.verdict] += 1
        return out

    @property
    def changed(self) -> int:
        """Decisions that are not the same: changed, new, missing or blocked."""
        return sum(1 for d in self.decisions if d.verdict != "same")

    @property
    def changed_share(self) -> float:
        """`changed` over all decisions compared (0 when none)."""
        return self.changed / len(self.decisions) if self.decisions else 0.0

    def exceeds(self, threshold: str) -> bool:
        """Whether more decisions changed than ``N`` or ``P%`` allows (``--max-changed``)."""
        limit = parse_threshold(threshold)
        if isinstance(limit, float):
            return self.changed_share * 100 > limit
        return self.changed > limit

    def deltas(self) -> dict[str, Any]:
        """Tokens and cost of the new runs minus the recorded ones, over all decisions."""
        total: dict[str, Any] = {"tokens_in": 0, "tokens_out": 0, "cost": 0.0}
        for d in self.decisions:
            for name, value in d.deltas().items():
                total[name] += value
        total["cost"] = round(total["cost"], 8)
        return total

    def to_json(self) -> dict[str, Any]:
        """The whole report as a JSON-ready dict."""
        return {
            "agent": self.agent, "since": self.since, "until": self.until,
            "version_new": self.version_new, "model": self.model, "reuse_llm": self.reuse_llm,
            "scanned": self.scanned, "notes": self.notes,
            "counts": self.counts(), "per_agent": self.per_agent(), "changed": self.changed,
            "changed_share": round(self.changed_share, 6), "deltas": self.deltas(),
            "llm_calls": self.llm_calls, "llm_cost": round(self.llm_cost, 8),
            "decisions": [d.to_json() for d in self.decisions],
        }  # fmt: skip

    def json_bytes(self) -> bytes:
        """Canonical JSON: the same replay gives the same bytes."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2,
                            default=repr) + b"\n"  # fmt: skip


def parse_threshold(text: str) -> int | float:
    """``12`` (decisions) or ``2.5%`` (of those compared); a ValueError names the forms."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            share = float(raw[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return share
        count = int(raw)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(
            f"--max-changed {text!r}: give a number of decisions (12) or a share (2.5%)"
        ) from None
