"""What a new user meets first in the `tidings` command, at 80 columns: real stores, real CLI.

Lists keep ids and names whole and summarise the rest, `show` prints long values in full,
a prefix that matches many ids (or an event id given for a record id) says what to type
instead, and every command's help reads cleanly.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from tests.conftest import NatsServer
from tests.integration.test_cli import Running, base_env, ok, poll, tidings
from tidings.cli import cli
from tidings.cli.display import stats_view, summary_line
from tidings.events import new_id, now
from tidings.runtime.pipeline import AgentStats
from tidings.store import open_store
from tidings.store.records import DeadLetter, Decision, Parked

AGENT = "payment-fraud-detector"
EVENT_TYPE = "payment.transaction.created.v2"
ANSWER = "The research shows " + " ".join(f"finding-{i} matters for reason {i}" for i in range(40))
SHARED = "00c0de"  # the prefix the crowds below share (no id made since 1970 starts so)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # styles, should the environment force colours


def squash(text: str) -> str:
    """`text` without whitespace and box lines: what is left when wrapping is undone."""
    return "".join(c for c in text if not c.isspace() and c not in "│╭╮╰╯─")


def plain(*args: str, env: dict[str, str], cwd: Path) -> str:
    """The output of a command that must succeed, without styles."""
    return ANSI.sub("", ok(*args, env=env, cwd=cwd))


def narrow(store_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of an 80-column terminal reading `store_url`."""
    return base_env(tmp_path, COLUMNS="80", TIDINGS_STORE=store_url)


def fails(*args: str, env: dict[str, str], cwd: Path) -> str:
    """The one-line error of a command that must fail (exit 1, no traceback)."""
    result = tidings(*args, env=env, cwd=cwd)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return ANSI.sub("", result.stderr)


def decision(agent: str = AGENT, **values: Any) -> Decision:
    fields: dict[str, Any] = dict(
        id=new_id(), agent=agent, agent_version="1", event_id=new_id(), event_type=EVENT_TYPE,
        correlation_id=None, key="customer-7", status="ok", result={"answer": ANSWER},
        state_before={}, state_after={"seen": 1}, emitted=[], steps=[], attempts=1,
        started_at=now(), duration_ms=2.5,
    )  # fmt: skip
    fields.update(values)
    return Decision(**fields)


def validation_error() -> str:
    """A real pydantic error, as the pipeline records it: many lines for one event."""

    class Payment(BaseModel):
        customer_id: str
        amount: float
        country: str

    try:
        Payment.model_validate({"customer_id": 5, "amount": "lots", "country": None})
    except ValidationError as e:
        return f"ValidationError: {e}"
    raise AssertionError("the data was meant to be invalid")


def dead_letter(error: str, **values: Any) -> DeadLetter:
    fields: dict[str, Any] = dict(
        id=new_id(), agent=AGENT, event_id=new_id(), event_type=EVENT_TYPE, subject="c7",
        headers={"ce-id": "x"}, body=b'{"amount": "lots"}', error=error, traceback=None,
        attempts=1, created_at=now(),
    )  # fmt: skip
    fields.update(values)
    return DeadLetter(**fields)


def question(**values: Any) -> Parked:
    fields: dict[str, Any] = dict(
        id=new_id(), agent="researcher", event_id=new_id(), question={"publish?": "draft 3"},
        headers={}, body=b"{}", deadline=time.time() + 3600,
    )  # fmt: skip
    fields.update(values)
    return Parked(**fields)


# -- narrow terminals ------------------------------------------------------------------------


async def test_lists_keep_ids_and_names_whole_and_show_prints_long_values_in_full(
    store_url: str, tmp_path: Path
) -> None:
    step = {"seq": 0, "kind": "llm", "name": "summarise-the-findings-of-the-corpus",
            "status": "done", "replayed": True, "ms": 1234.5, "tokens_in": 1200,
            "tokens_out": 300, "cost": 0.0012, "result": {"text": ANSWER}}  # fmt: skip
    decisions = [
        decision(steps=[step]),
        decision(agent="notifier", status="dead_lettered", error="boom"),
    ]
    error = validation_error()
    letter = dead_letter(error)
    waiting, forever, answered, late = question(), question(deadline=None), question(), question()
    async with open_store(store_url) as store:
        for d in decisions:
            await store.add_decision(d)
        await store.add_dead_letter(letter)
        for q in (waiting, forever, answered, late):
            await store.park(q)
        await store.answer_parked(answered.id, True, by="alice")
        await store.mark_resumed(answered.id)
        await store.answer_parked(late.id, None, status="timed_out", by="timeout")
    env = narrow(store_url, tmp_path)

    listed = plain("decisions", "ls", env=env, cwd=tmp_path)
    for d in decisions:
        assert d.id in listed and d.agent in listed
    assert EVENT_TYPE in listed and "customer-7" in listed and "dead_lettered" in listed
    assert "decisions (2)" in listed
    assert all(len(line) <= 80 for line in listed.splitlines())

    shown = plain("decisions", "show", decisions[0].id, env=env, cwd=tmp_path)
    assert squash(ANSWER) in squash(shown)  # wrapped, not cut
    assert "steps (1)" in shown and "summarise-the-findings-of-the-corpus" in shown
    assert "1200/300 tokens" in shown and "replayed" in shown
    assert all(len(line) <= 80 for line in shown.splitlines())

    letters = plain("dlq", "ls", env=env, cwd=tmp_path)
    assert letter.id in letters and AGENT in letters and EVENT_TYPE in letters
    assert "ValidationError" in letters
    # One record is two lines (plus title, two header lines and the rule), not one per
    # word of the error.
    assert len(letters.strip().splitlines()) == 6, letters
    shown_letter = plain("dlq", "show", letter.id, env=env, cwd=tmp_path)
    assert squash(error) in squash(shown_letter)

    asked = plain("approvals", "ls", "--status", "all", env=env, cwd=tmp_path)
    for q in (waiting, forever, answered, late):
        assert q.id in asked
    assert "answered by alice" in asked and "timed out" in asked and "no deadline" in asked
    assert asked.count("deadline in") == 1  # only the question still waiting has one
    assert "approvals (4)" in asked

    long_question = question(question={"question": ANSWER, "ask": "Answer from the model?"})
    async with open_store(store_url) as store:
        await store.park(long_question)
    shown_question = plain("approvals", "show", long_question.id[:-4], env=env, cwd=tmp_path)
    assert squash(ANSWER) in squash(shown_question)  # the whole question, not cut
    assert "deadline in" in shown_question
    assert squash(f"tidings approvals answer {long_question.id} ANSWER") in squash(shown_question)
    assert all(len(line) <= 80 for line in shown_question.splitlines())
    shown_answered = plain("approvals", "show", answered.id, env=env, cwd=tmp_path)
    assert "answered by alice" in shown_answered and "approvals answer" not in shown_answered


async def test_a_list_cut_by_its_limit_says_of_how_many(store_url: str, tmp_path: Path) -> None:
    made = [decision(), decision(), decision(), decision(agent="notifier")]
    async with open_store(store_url) as store:
        for d in made:
            await store.add_decision(d)
    env = narrow(store_url, tmp_path)
    assert "decisions (4)" in plain("decisions", "ls", env=env, cwd=tmp_path)
    cut = plain("decisions", "ls", "--limit", "2", env=env, cwd=tmp_path)
    assert "decisions: the 2 newest of 4 (raise --limit" in cut
    mine = plain("decisions", "ls", "--agent", AGENT, "--limit", "2", env=env, cwd=tmp_path)
    assert "the 2 newest of 3" in mine
    # The store counts by agent only: with an event filter the title says what it can.
    about = plain("decisions", "ls", "--event", made[0].event_id, "--limit", "1", env=env,
                  cwd=tmp_path)  # fmt: skip
    assert "the 1 newest (there may be more" in about


# -- id prefixes ---------------------------------------------------------------------------


def crowded_id() -> str:
    """A UUIDv7 moved to share its first characters with the others, as ids of one minute do."""
    return SHARED + new_id()[len(SHARED) :]


async def test_an_ambiguous_prefix_names_the_prefixes_that_pick_one(
    store_url: str, tmp_path: Path
) -> None:
    crowd = [decision(id=crowded_id()) for _ in range(214)]
    async with open_store(store_url) as store:
        for d in crowd:
            await store.add_decision(d)
    env = narrow(store_url, tmp_path)

    message = fails("decisions", "show", SHARED, env=env, cwd=tmp_path)
    assert f"ambiguous: 214 decisions start with '{SHARED}'" in message
    assert "tidings decisions ls" in message
    picks = [line.split()[0] for line in message.splitlines() if line.startswith("  ")]
    assert len(picks) == 5
    ids = {d.id for d in crowd}
    for pick in picks[:2]:  # each prefix shown picks exactly one decision
        assert sum(i.startswith(pick) for i in ids) == 1
        picked = json.loads(ok("decisions", "show", pick, "--json", env=env, cwd=tmp_path))
        assert picked["id"].startswith(pick) and picked["id"] in ids

    short = fails("decisions", "show", SHARED[:4], env=env, cwd=tmp_path)
    assert "too short" in short and "6+ characters" in short
    missing = fails("decisions", "show", "zzzzzzzz", env=env, cwd=tmp_path)
    assert "no decision 'zzzzzzzz'" in missing


async def test_an_event_id_given_for_a_record_id_says_where_to_look(
    store_url: str, tmp_path: Path
) -> None:
    made = decision()
    letter = dead_letter("RuntimeError: boom")
    waiting = question()
    twins = [dead_letter("RuntimeError: boom", id=crowded_id()) for _ in range(2)]
    async with open_store(store_url) as store:
        await store.add_decision(made)
        for each in (letter, *twins):
            await store.add_dead_letter(each)
        await store.park(waiting)
    env = narrow(store_url, tmp_path)

    whole = fails("decisions", "show", made.event_id, env=env, cwd=tmp_path)
    assert "is an event id, not a decision id" in whole
    assert f"tidings decisions ls --event {made.event_id}" in whole and made.id in whole
    start = fails("decisions", "show", made.event_id[:30], env=env, cwd=tmp_path)
    assert f"the start of event id {made.event_id}" in start and "--event" in start

    letters = fails("dlq", "show", letter.event_id or "", env=env, cwd=tmp_path)
    assert "is an event id, not a dead letter id" in letters
    assert f"tidings dlq show {letter.id}" in letters
    both = fails("dlq", "retry", SHARED, env=env, cwd=tmp_path)
    assert f"ambiguous: 2 dead letters start with '{SHARED}'" in both

    asked = fails("approvals", "answer", waiting.event_id, "true", env=env, cwd=tmp_path)
    assert "is an event id, not a question id" in asked and waiting.id in asked


# -- help ------------------------------------------------------------------------------------


def command_paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def test_every_help_reads_cleanly_at_80_columns() -> None:
    paths = list(command_paths(get_command(cli)))
    assert ("decisions", "show") in paths and ("tail",) in paths
    for path in paths:
        result = CliRunner().invoke(cli, [*path, "--help"], env={"COLUMNS": "80"})
        where = " ".join(("tidings", *path))
        assert result.exit_code == 0, f"{where} --help:\n{result.output}"
        text = ANSI.sub("", result.output)
        assert "<bool>" not in text, f"{where}: a flag shown as taking a value\n{text}"
        assert "[[" not in text and "]...]" not in text, f"{where}: doubled brackets\n{text}"
        assert all(len(line) <= 80 for line in text.splitlines()), text
        assert "…" not in text, f"{where}: help cut short\n{text}"
    tail = CliRunner().invoke(cli, ["tail", "--help"], env={"COLUMNS": "80"}).output
    assert "[PATTERN]..." in tail
    publish = CliRunner().invoke(cli, ["publish", "--help"], env={"COLUMNS": "80"}).output
    assert "[JSON]" in publish


# -- tidings run's counters --------------------------------------------------------------


def test_counters_show_filter_errors_beside_filtered_at_80_columns() -> None:
    stats = {
        "fraud-detector": AgentStats(received=12, filtered=8, filter_errors=3, handled=4),
        "notifier": AgentStats(received=4, handled=4),
    }
    console = Console(width=80, record=True, color_system=None)
    console.print(stats_view(stats))
    table = console.export_text()
    header = [line.split() for line in table.splitlines()[1:3]]
    assert header[0] == ["filter", "dead"]
    assert header[1][header[1].index("filtered") + 1] == "errors"
    row = next(line.split() for line in table.splitlines() if line.startswith("fraud-detector"))
    assert row == ["fraud-detector", "12", "8", "3", "4", "0", "0", "0"]
    assert "…" not in table
    assert "filtered=8 filter_errors=3 handled=4" in summary_line(stats)


# -- tidings agents ------------------------------------------------------------------------

APP_SOURCE = textwrap.dedent(
    """
    from tidings import App, Context, Event

    app = App("firsthour")


    @app.tool("lookup-customer-record")
    async def lookup(customer_id: str) -> str:
        return customer_id


    @app.agent("payment-fraud-detector", on="payment.>", where="data.amount > 1000")
    async def detect(event: Event, ctx: Context) -> dict[str, object]:
        return {"verdict": "ok"}
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "firsthour.py").write_text(APP_SOURCE)
    return tmp_path


@pytest.mark.nats
def test_agents_tells_the_runtime_consumers_apart_and_run_counts_filter_errors(
    app_dir: Path, nats_server: NatsServer, namespace: str
) -> None:
    env = base_env(
        app_dir, COLUMNS="80", TIDINGS_BUS=nats_server.url, TIDINGS_NAMESPACE=namespace,
        TIDINGS_STORE=f"sqlite:///{app_dir / 'store.db'}",
    )  # fmt: skip
    worker = Running(["firsthour:app"], env, app_dir)
    try:
        worker.wait_for("tidings run firsthour")
        # `where` cannot compare "lots" with 1000: a filter error, counted as filtered too.
        ok("publish", "payment.made", '{"amount": "lots"}', env=env, cwd=app_dir)
        worker.wait_for("filtered=1 filter_errors=1")

        def agent_rows() -> dict[str, Any]:
            return {r["name"]: r for r in json.loads(ok("agents", "--json", env=env, cwd=app_dir))}

        # The worker reports the count to the store; any terminal's `agents` shows it.
        rows = poll(lambda: (r := agent_rows())[AGENT].get("filter_errors") and r, "the count")
        errors = rows[AGENT]["filter_errors"]
        assert (errors["count"], errors["expression"]) == (1, "data.amount > 1000")
        assert errors["latest_error"].startswith("data.amount = 'lots' (No matching overloads")
        assert rows[AGENT]["kind"] == "agent"
        assert rows[f"{AGENT}:replies"]["kind"] == "tool replies"
        assert rows["firsthour:approvals"]["kind"] == "approval answers"
        assert rows["tool:lookup-customer-record"]["kind"] == "tool"

        shown = plain("agents", "firsthour:app", env=env, cwd=app_dir)
        assert all(len(line) <= 80 for line in shown.splitlines())
        agents, runtime = shown.split("runtime consumers (internal)")
        runtime, declared = runtime.split("declared in firsthour:app")
        assert AGENT in agents and f"{AGENT}:replies" not in agents
        assert f"{AGENT}: 1 filter error " in " ".join(agents.split())
        for name in (f"{AGENT}:replies", "firsthour:approvals", "tool:lookup-customer-record"):
            assert name in runtime  # whole, on one line
        assert "records the" in runtime and "runs tool calls" in runtime
        assert "approvals" not in declared and AGENT in declared
        assert worker.terminate() == 0
    finally:
        worker.kill()
    assert "filter_errors=1" in worker.output and "Traceback" not in worker.output
