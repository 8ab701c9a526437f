"""Replay for real: run a window's triggering events again into the live system.

Each event goes through the normal exactly-once path (`Committer`: processed marker,
state, decision and outbox in one transaction, then the outbox published with the
emitted ids as dedupe ids), under an inbox id of its own derived from (agent, event id,
new version): the first run's marker stays, so both decisions stay in the ledger, each
with the version that made it, and applying the same window with the same version again
is a duplicate that commits and publishes nothing new. State is the live state (the
window is re-processed into the system as it is now). Tool calls go over the bus to the
running tool services under call ids derived from the new inbox id, so the first run's
replies are not reused; model calls are made again (their journal is the new run's).
A handler that would park (`ctx.ask`, `ctx.sleep`, `ctx.wait_for`) is stopped before it
writes anything, and it and one that raises are reported and not committed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidings.bus.base import Bus
from tidings.errors import PolicyViolation, StateConflict
from tidings.events import Event, now
from tidings.replay.shadow import ReadBack
from tidings.runtime.context import Context, Services
from tidings.runtime.durable import AgentParked
from tidings.runtime.outcomes import describe
from tidings.runtime.pipeline import Pipeline
from tidings.runtime.steps import Journal, derived_id
from tidings.runtime.tools import ReplyHub
from tidings.store.base import Store
from tidings.store.records import Commit

if TYPE_CHECKING:
    from tidings.app import App
    from tidings.replay import Window


class CannotPark(Exception):
    """Raised into an applied handler at a call that would park its event."""


class ApplyContext(Context):
    """`Context` for an applied run: a park (ask, sleep, wait_for) is refused before it writes.

    A parked entry or timer of an applied run would be left in the live store (a question
    in `tidings approvals`, a timer handing the event back to the live agent), so the
    event is reported as not applied instead.
    """

    refused: CannotPark | None = None  # kept: a handler that catches it is still refused

    def _refuse(self, what: str) -> CannotPark:
        self.refused = self.refused or CannotPark(
            f"it {what}: an applied run cannot park, so it was not applied"
        )
        return self.refused

    async def ask(self, question: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Refused: the event is not applied."""
        raise self._refuse("asks (ctx.ask)")

    async def sleep(self, seconds: float) -> None:
        """Refused: the event is not applied."""
        raise self._refuse("sleeps (ctx.sleep)")

    async def wait_for(
        self,
        type_pattern: str,
        *,
        match: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        raise_on_timeout: bool = False,
    ) -> Event | None:
        """Refused: the event is not applied."""
        raise self._refuse(f"waits for {type_pattern!r} (ctx.wait_for)")


@dataclass(slots=True)
class Applied:
    """What an apply did: events committed, already applied, filtered, and failures."""

    version: str
    committed: int = 0
    duplicates: int = 0
    filtered: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (event id, why)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "version": self.version, "committed": self.committed, "duplicates": self.duplicates,
            "filtered": self.filtered, "failed": [list(f) for f in self.failed],
        }  # fmt: skip


def inbox_id(agent: str, event_id: str, version: str) -> str:
    """The processed-marker id of an applied run: one per (agent, event, version)."""
    return derived_id(agent, event_id, "apply", version)


async def apply_window(
    app: App,
    agent: str,
    window: Window,
    bus: Bus,
    store: Store,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
) -> Applied:
    """Run `agent` of `app` on every event of `window` for real, once per version."""
    spec = app.agents[agent]
    services = Services(
        bus, store, ReplyHub(store), app.llm, dict(app.tools),
        schemas=app.schemas, policy=app.rules(),  # the live path's, denials included
    )  # fmt: skip
    pipeline = Pipeline(spec, services, app.name)
    committer = pipeline.committer
    services.served.update(await store.served_tools())
    applied = Applied(spec.version)
    wanted = set(keys) if keys else None
    for raw in window.events:
        if limit is not None and applied.committed + applied.duplicates >= limit:
            break
        screened = pipeline.screen(ReadBack(raw))
        if not isinstance(screened, Event):
            applied.filtered += 1
            continue
        event = screened
        key = spec.key_of(event)
        if wanted is not None and key not in wanted:
            continue
        marker = inbox_id(spec.name, event.id, spec.version)
        if await committer.replay(spec.name, marker):  # applied before: re-publish only
            applied.duplicates += 1
            continue
        ctx = ApplyContext(spec, event, key, 1, store, app.name, services)
        ctx.journal = Journal(store, spec.name, marker)
        seen = event
        started_at, started = now(), time.perf_counter()
        try:
            if spec.data_model is not None:
                seen = event.replace(data=spec.data_model.model_validate(event.data))
            result = await spec.handler(seen, ctx)
            if ctx.parked is not None:
                raise AgentParked(ctx.parked)
            if ctx.refused is not None:
                raise ctx.refused
            if ctx.guard.denials:  # even if the handler caught it: live commits no effect
                raise PolicyViolation(str(ctx.guard.denials[0]), ctx.guard.denials[0].rule)
            decision = pipeline._decision(event, key, ctx, result, started_at,
                                          time.perf_counter() - started)  # fmt: skip
        except CannotPark as e:
            applied.failed.append((event.id, str(e)))
            continue
        except AgentParked:  # parked some other way (nothing in the API today)
            applied.failed.append((event.id, "parked: not applied"))
            continue
        except Exception as e:
            applied.failed.append((event.id, describe(e)))
            continue
        commit = Commit(
            agent=spec.name, event_id=marker, key=key, decision=decision,
            state=ctx.state.after if ctx.state.dirty else None,
            expected_version=ctx.state.version, outbox=ctx.outbox,
            more_state=ctx.guard.writes(),  # the entities its emits moved (app.policy)
        )  # fmt: skip
        try:
            committed = await committer.commit(commit)
        except StateConflict as e:  # a live worker changed the key meanwhile: run it again
            applied.failed.append((event.id, describe(e)))
            continue
        if committed:
            applied.committed += 1
        else:
            applied.duplicates += 1
    return applied
