"""The replay's diff and verdicts, pure; the read-only store and the bus that never publishes."""

from __future__ import annotations

import pytest

from tidings.errors import ReplayRefused
from tidings.events import Event
from tidings.replay import Outcome, Report, diff, parse_threshold
from tidings.replay.report import judge
from tidings.replay.shadow import ReadOnlyStore, ShadowBus
from tidings.store import open_store
from tidings.store.records import Commit, Decision, Step


def test_diff_names_each_leaf_by_path_and_types_count() -> None:
    old = {"a": 1, "b": [1, {"c": "x"}], "d": True, "e": 1}
    new = {"a": 1.0, "b": [1, {"c": "y"}, 3], "d": 1, "f": None}
    got = {(c.path, repr(c.old), repr(c.new)) for c in diff(old, new)}
    assert got == {
        ("a", "1", "1.0"),
        ("b[1].c", "'x'", "'y'"),
        ("b[2]", "<absent>", "3"),
        ("d", "True", "1"),
        ("e", "1", "<absent>"),
        ("f", "<absent>", "None"),
    }
    assert diff({"x": [1, 2]}, {"x": [1, 2]}) == []


def test_verdicts_and_the_gate() -> None:
    same = Outcome("ok", {"q": 1})
    report = Report("a", "s", "u", "v2", None, False)
    report.decisions = [
        judge("a", "1", "t", "k", same, Outcome("ok", {"q": 1}, llm=[{"answer": "other"}])),
        judge("a", "2", "t", "k", same, Outcome("ok", {"q": 2})),
        judge("a", "3", "t", None, None, same),
        judge("a", "4", "t", None, same, None),
        judge("a", "5", "t", None, same, Outcome("blocked"), blocked="would call x"),
    ]
    assert report.counts() == {"same": 1, "changed": 1, "new": 1, "missing": 1, "blocked": 1}
    assert [c.path for c in report.decisions[1].changes] == ["result.q"]
    assert report.changed == 4 and report.changed_share == pytest.approx(0.8)
    assert report.exceeds("3") and not report.exceeds("4")
    assert report.exceeds("79.9%") and not report.exceeds("80%")
    assert report.json_bytes() == report.json_bytes()
    for bad in ("-1", "x", "101%", "1.5"):
        with pytest.raises(ValueError, match="give a number of decisions"):
            parse_threshold(bad)


def _decision() -> Decision:
    return Decision("d1", "a", "v1", "e1", "t", None, "k", "ok", None, {}, {}, [], [], 1,
                    "2026-01-01T00:00:00Z", 0.0)  # fmt: skip


async def test_the_shadow_store_reads_and_refuses_every_write(tmp_path: object) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    await store.open()
    try:
        shadow = ReadOnlyStore(store)  # type: ignore[abstract]
        assert (await shadow.load_state("a", "k")).version == 0
        assert await shadow.list_decisions("a") == []
        # The reads of the policy's budgets, sagas and timers are allowed too.
        assert await shadow.budget_spent("a:tool_calls_per_minute", 0) == 0
        assert await shadow.get_saga("s", "k") is None
        assert await shadow.list_timers() == []
        step = Step("a", "e1", 0, "step", "s", "h", "done", 1, {})
        for write in (
            shadow.commit(Commit("a", "e1", "k", _decision())),
            shadow.add_decision(_decision()),
            shadow.save_step(step),
            shadow.register_tool("t", "app"),
        ):
            with pytest.raises(ReplayRefused, match="it writes, so it was refused"):
                await write
        assert await store.count_decisions() == 0
    finally:
        await store.close()


async def test_the_shadow_bus_never_publishes() -> None:
    from tidings.bus.memory import MemoryBus

    bus = MemoryBus("memory://replay-unit")
    await bus.connect()
    try:
        with pytest.raises(ReplayRefused, match="tried to publish"):
            await ShadowBus(bus).publish(Event.create("a.b", {}, source="/t"))
        ShadowBus(bus).check(Event.create("a.b", {}, source="/t"))  # limits as the real bus
    finally:
        await bus.close()


def test_the_command_is_listed_as_replay_and_its_help_fits_80_columns() -> None:
    from typer.testing import CliRunner

    from tidings.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert "│ replay " in listed.output and "replay-command" not in listed.output
    shown = runner.invoke(cli, ["replay", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert shown.exit_code == 0
    intro = shown.output.split("╭")[0].splitlines()
    # Each line of the description is filled: none is a lone word a re-wrap left behind.
    assert all(len(line.split()) != 1 for line in intro if line.strip()), intro
    options = shown.output.split("Options")[1]
    assert "<str>" not in options and "list[" not in options  # each says what it takes


def test_the_terminal_table_keeps_each_old_and_new_value_beside_its_field() -> None:
    from rich.console import Console

    from tidings.replay.render import terminal

    old = Outcome(status="ok", result={"queue": "billing"},
                  emitted=[{"type": "ticket.routed", "data": {"queue": "billing"}}])  # fmt: skip
    new = Outcome(status="ok", result={"queue": "refunds"},
                  emitted=[{"type": "ticket.routed", "data": {"queue": "refunds"}}])  # fmt: skip
    report = Report("support", "t0", "t1", "v2", None, False)
    report.decisions.append(judge("support", "e" * 36, "ticket.opened", "c4", old, new))
    console = Console(width=80, record=True, color_system=None)
    console.print(terminal(report))
    lines = console.export_text().splitlines()
    # The long path wraps inside its cell; its values stay on its first line.
    first = next(line for line in lines if "emitted[0]" in line)
    second = next(line for line in lines if "result.queue" in line)
    assert "billing" in first and "refunds" in first
    assert "billing" in second and "refunds" in second


def test_a_call_not_made_is_in_the_terminal_and_the_html() -> None:
    from rich.console import Console

    from tidings.replay.render import terminal, to_html

    old = Outcome(status="ok", result={"queue": "billing"})
    new = Outcome(status="ok", result={"queue": "refunds"})
    report = Report("support", "t0", "t1", "v2", None, False)
    calls = [{"tool": "mail.send", "args": {"to": "c4"}, "stand_in": {"sent": True}}]
    report.decisions.append(judge("support", "e1", "t", "c4", old, new, would_call=calls))
    console = Console(width=120, record=True, color_system=None)
    console.print(terminal(report))
    row = next(line for line in console.export_text().splitlines() if "would call" in line)
    assert "mail.send" in row and '{"to":"c4"}' in row and 'stand-in {"sent":true}' in row
    page = to_html(report)
    assert "would call mail.send with <code>{\n  &quot;to&quot;: &quot;c4&quot;\n}" in page


def test_a_bad_until_is_named_as_until() -> None:
    from typer.testing import CliRunner

    from tidings.cli import cli

    given = ["replay", "a", "--since", "1d", "--until", "bogus", "--code", "x:app"]
    result = CliRunner().invoke(cli, given)
    assert result.exit_code == 1
    assert "--until 'bogus' is neither a span back from now" in result.output
