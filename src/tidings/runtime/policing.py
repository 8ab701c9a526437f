"""The policy, enforced: the thin part around `tidings.policy`'s pure evaluator.

    ctx.emit       Rules.emit, then Entity.decide for each entity the type moves
    ctx.tool       Rules.tool, then one call charged to the agent's per-minute budget
    ctx.llm        checked against the hourly budgets before, charged after the call
    tool service   Rules.tool again, for callers that did not ask (another app, a script)
    pipeline       a run with a denial commits a "denied" decision with the rule, nothing else

An entity's state is a state row (agent ``policy:entity:<name>``, its key), read once
per handler run and written with the run's commit by the same optimistic rule as the
agent's own state, so a crash or a duplicate never moves it twice and two workers never
both move it from one state. A budget's total is a row the store charges by
compare-and-set (`Budgets`), shared by every worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidings.errors import BudgetExceeded, PolicyViolation
from tidings.events import Event, lookup
from tidings.policy import AgentRules, Budget, Denied, Entity, Metric, Rules, window
from tidings.store.base import Store
from tidings.store.records import StateWrite

if TYPE_CHECKING:
    from tidings.runtime.spec import AgentSpec

ENTITY_ROWS = "policy:entity:"  # + the entity's name: the agent name of its state rows
# The clock budget windows are read from (epoch seconds); tests set a fixed one.
clock: Callable[[], float] = time.time


def rules_for(spec: AgentSpec, rules: Rules | None) -> Rules:
    """The table an agent runs under: its app's, or (a bare Pipeline) its own `emits=`."""
    if rules is not None and (spec.name in rules.agents or spec.emits is None):
        return rules
    row = AgentRules(spec.name, emits=spec.emits)
    base = rules or Rules()
    return Rules({**base.agents, spec.name: row}, base.entities, base.publishers)


@dataclass(slots=True)
class _Slot:
    read: str | None  # the state as read (None: a new entity)
    version: int
    now: str | None  # the state after this run's emits so far


class Guard:
    """One handler run's enforcement: what it was denied, and the entity moves it made."""

    def __init__(self, rules: Rules, agent: str, store: Store) -> None:
        self.rules = rules
        self.agent = agent
        self.store = store
        self.denials: list[Denied] = []
        self._slots: dict[tuple[str, str], _Slot] = {}

    def deny(self, denied: Denied) -> PolicyViolation:
        """Record a denial for the decision; the error to raise in the handler."""
        self.denials.append(denied)
        return PolicyViolation(str(denied), denied.rule)

    def stopped(self) -> None:
        """Raise the run's denial again once it has one.

        A handler that catches it and goes on makes no further emit, tool call or model
        call: the run is denied.
        """
        if self.denials:
            first = self.denials[0]
            raise PolicyViolation(f"{first}; this run is already denied", first.rule)

    def check_emit(self, event_type: str) -> None:
        """Raise (and record) unless the agent may emit `event_type`."""
        self.stopped()
        denied = self.rules.emit(self.agent, event_type)
        if denied is not None:
            raise self.deny(denied)

    async def move(self, event: Event) -> None:
        """Move each entity `event` moves along the table, or raise (and record)."""
        for entity in self.rules.moved_by(event.type):
            key = lookup(event, entity.key)
            if key is None or key == "":
                raise self.deny(
                    Denied(
                        entity.rule,
                        f"{event.type!r} moves {entity.name} but has no {entity.key}:"
                        f" emit it with the {entity.name}'s id there",
                    )
                )
            slot = await self._slot(entity, str(key))
            decided = entity.decide(slot.now, event.type)
            if isinstance(decided, Denied):
                raise self.deny(decided)
            slot.now = decided

    async def _slot(self, entity: Entity, key: str) -> _Slot:
        slot = self._slots.get((entity.name, key))
        if slot is None:
            snapshot = await self.store.load_state(ENTITY_ROWS + entity.name, key)
            state = snapshot.values.get("state")
            slot = _Slot(state, snapshot.version, state)
            self._slots[(entity.name, key)] = slot
        return slot

    def writes(self) -> tuple[StateWrite, ...]:
        """The entity states this run moved, to be written with its commit."""
        return tuple(
            StateWrite(ENTITY_ROWS + name, key, {"state": slot.now}, slot.version)
            for (name, key), slot in self._slots.items()
            if slot.now != slot.read
        )

    def check_tool(self, tool: str) -> None:
        """Raise (and record) unless the agent may call `tool`."""
        self.stopped()
        denied = self.rules.tool(self.agent, tool)
        if denied is not None:
            raise self.deny(denied)

    async def charge_tool_call(self) -> None:
        """Count one tool call against the per-minute budget; raise if it is spent."""
        budget = self.rules.budget(self.agent)
        if budget is not None and budget.tool_calls_per_minute is not None:
            await self._charge(budget, "tool_calls_per_minute", 1.0)

    async def check_llm(self) -> None:
        """Raise if an hourly model budget is spent (a call is charged once it is known)."""
        self.stopped()
        budget = self.rules.budget(self.agent)
        if budget is None:
            return
        metrics: tuple[Metric, ...] = ("llm_tokens_per_hour", "llm_cost_per_hour")
        for metric in metrics:
            if metric in budget.limits():
                await self._charge(budget, metric, 0.0)

    async def charge_llm(self, tokens: int, cost: float) -> None:
        """Add a finished call's tokens and cost to the hourly totals (never refused)."""
        budget = self.rules.budget(self.agent)
        if budget is None:
            return
        limits = budget.limits()
        now = clock()
        spent: tuple[tuple[Metric, float], ...] = (
            ("llm_tokens_per_hour", float(tokens)), ("llm_cost_per_hour", float(cost)),
        )  # fmt: skip
        for metric, amount in spent:
            if metric in limits and amount:
                start, _ = window(metric, now)
                await self.store.charge_budget(f"{self.agent}:{metric}", start, amount, None)

    async def _charge(self, budget: Budget, metric: Metric, amount: float) -> None:
        limit = budget.limits()[metric]
        start, left = window(metric, clock())
        if await self.store.charge_budget(f"{self.agent}:{metric}", start, amount, limit):
            return
        what = "hold" if budget.over == "hold" else "dead_letter"
        rule = f"budget:{self.agent}:{metric}"
        raise BudgetExceeded(
            f"agent {self.agent!r} has spent its {metric}={limit:g} for this window"
            + (f"; held for {left:.0f}s, until the next window" if what == "hold" else
               "; dead-lettered (over='dead_letter'): `tidings dlq retry` it later")
            + f", or raise the budget in app.policy.agent(...) (rule {rule})",
            rule=rule,
            hold=what == "hold",
            retry_after=max(left, 0.05),
        )  # fmt: skip


def tool_caller(rules: Rules, tool: str, caller: str | None) -> Denied | None:
    """Whether the agent named in a call's `reply_to` may call `tool` (the serving side)."""
    if caller is None:
        return None
    return rules.tool(caller, tool)
