"""PostgreSQL change data capture: committed row changes as events, by logical replication.

PostgreSQL's built-in `pgoutput` plugin streams the changes of a publication's tables from
a replication slot. psycopg2's logical replication connection is the Python client that
can read that stream (psycopg 3 and asyncpg cannot); it blocks, so the stream runs in a
thread that hands each message to the event loop, where it is decoded and published.

The guarantees of `triggers/base.py`, here:

1. An event's id is `source_id(trigger, commit LSN, position of the change in its
   transaction)`, so a transaction streamed again after a restart makes the same ids.
2. Changes are published one at a time in stream order through `Sink.publish`, so a
   row's changes reach the bus in commit order, and a copy is dropped by id.
3. The slot's flushed position (`confirmed_flush_lsn`) moves to a transaction's end only
   once the bus confirmed every change of it. PostgreSQL streams again every transaction
   that ends after that position; (2) drops the copies.
4. An unreachable server, `wal_level` other than `logical`, a missing table or a missing
   privilege raise `TriggerUnavailable` naming the fix; a lost connection ends the run and
   the runner starts it again until the server answers.

Transactions that hold nothing for the trigger (writes to other tables, which PostgreSQL 15
and newer do not even send, and the server's keepalives) move the slot forward too, once
everything before them was published: a busy table outside the publication does not make
the slot keep WAL. Decoding is pure (`triggers/pgoutput.py`); `_Stream` is the thin
driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import re
import select
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import structlog

from tidings.errors import ConfigError, EventTooLarge
from tidings.events import MAX_SUBJECT, Event, survives_the_wire
from tidings.triggers.base import Sink, Trigger, TriggerUnavailable, source_id
from tidings.triggers.pgoutput import Changes, RowChange, TransactionEnd, decode, format_lsn

if TYPE_CHECKING:
    from tidings.client import Client

log = structlog.get_logger("tidings.triggers.postgres")

WAL_LEVEL_FIX = "set wal_level = logical in postgresql.conf and restart PostgreSQL"
PRIVILEGE_FIX = (
    "the trigger's role needs the REPLICATION attribute (ALTER ROLE name REPLICATION) and"
    " CREATE on the database to create its publication, or a superuser"
)
POLL_S = 0.2  # how often the stream thread looks for a stop or a new flushed position
BATCH = 256  # messages handed to the loop at once: one wake-up of the loop per batch
PUBLICATION_CHECK_S = 10.0  # how often the trigger's own publication is checked for its tables
_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def slot_name(app: str, trigger: str) -> str:
    """The replication slot of `trigger` in `app`: lower case, digits and '_', ≤ 63 chars."""
    name = re.sub(r"[^a-z0-9_]", "_", f"tidings_{app}_{trigger}".lower())
    if len(name) > 63:
        name = name[:54] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


# -- the trigger ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of `tidings doctor`: ok (True), failed (False) or a warning (None)."""

    ok: bool | None
    title: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None


class PostgresChanges(Trigger):
    """Row changes of chosen tables as ``<prefix>.<table>.inserted | updated | deleted``.

    ``tables`` are ``"schema.table"`` or ``"table"`` (schema ``public``); the trigger keeps
    a publication of them (named like the slot) unless ``publication=`` names an existing
    one, whose tables then all count (or only ``tables`` among them, where both are given).
    The slot is ``tidings_<app>_<trigger>`` unless ``slot=`` names one; it is created on
    the first start and captures changes committed from then on. ``old_rows=True`` says
    the full row before is wanted (REPLICA IDENTITY FULL), which the trigger and
    `tidings doctor` then check.
    """

    kind: ClassVar[str] = "postgres"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        tables: Sequence[str] = (),
        publication: str | None = None,
        slot: str | None = None,
        prefix: str = "db",
        old_rows: bool = False,
        max_lag_bytes: int = 1 << 30,
        status_interval_s: float = 1.0,
        max_in_flight: int = 1000,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(name)
        if importlib.util.find_spec("psycopg2") is None:
            raise ConfigError(
                f"trigger {name!r} streams PostgreSQL changes with psycopg2, which is not"
                ' installed: pip install "tidings[cdc]"'
            )
        if not tables and publication is None:
            raise ConfigError(
                f"trigger {name!r}: name the tables to capture (tables=['public.orders']) or"
                " an existing publication (publication='name')"
            )
        if not all(_TOKEN.match(token) for token in prefix.split(".")):
            raise ConfigError(
                f"trigger {name!r}: prefix {prefix!r} is not dot-separated tokens of letters,"
                " digits, '_' or '-'; use e.g. prefix='db'"
            )
        if slot is not None and not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ConfigError(
                f"trigger {name!r}: slot {slot!r} is not a replication slot name: use at most"
                " 63 lower-case letters, digits and '_'"
            )
        if status_interval_s < 1:
            raise ConfigError(
                f"trigger {name!r}: status_interval_s={status_interval_s} is below 1 s, the"
                " shortest interval psycopg2 reports the flushed position at; use 1 or more"
            )
        self.url = url
        self.tables = tuple(_qualified(t) for t in tables)
        self.publication = publication
        self.slot = slot
        self.prefix = prefix
        self.old_rows = old_rows
        self.max_lag_bytes = max_lag_bytes
        self.status_interval_s = status_interval_s
        self.max_in_flight = max_in_flight
        self.connect_timeout_s = connect_timeout_s
        self._app: str | None = None

    # -- names

    def slot_for(self, app: str) -> str:
        """The slot this trigger streams from in `app`."""
        return self.slot or slot_name(app, self.name)

    def publication_for(self, app: str) -> str:
        """The publication it reads: the declared one, or its own named like the slot."""
        return self.publication or self.slot_for(app)

    def describe(self) -> dict[str, Any]:
        """The server, the tables, the publication and the slot."""
        if self._app is not None:
            slot, publication = self.slot_for(self._app), self.publication_for(self._app)
        else:  # declared, not run yet: the app's name completes it
            slot = self.slot or slot_name("APP", self.name).replace("_app_", "_<app>_", 1)
            publication = self.publication or slot
        return {
            "server": _where(self.url),
            "tables": [".".join(t) for t in self.tables] or "the publication's",
            "publication": publication,
            "slot": slot,
        }

    # -- running

    async def run(self, sink: Sink) -> None:
        """Stream, publish, and flush each transaction after its publishes (guarantees 1-4).

        A slot streams to one reader at a time, so with a store the workers running the
        trigger take its lease in turn (the others stand by); without one, PostgreSQL
        refuses a second reader itself ("slot is active") and the runner retries.
        """
        self._app = _app_of(sink.client)
        sink.status.description = self.describe()
        if sink.store is None:
            await self._stream(sink)
            return
        async with sink.exclusive():
            await self._stream(sink)

    async def _stream(self, sink: Sink) -> None:
        app = self._app or _app_of(sink.client)
        slot, publication = self.slot_for(app), self.publication_for(app)
        primary_keys, created = await asyncio.to_thread(self._prepare, slot, publication)
        await self._note_slot(sink, slot, created)
        wanted = frozenset(self.tables) if self.tables else None
        changes = Changes(wanted, primary_keys)
        stream = _Stream(self, slot, publication, asyncio.get_running_loop())
        stream.start()
        log.info("streaming changes", trigger=self.name, slot=slot, publication=publication)
        watch = None
        if self.publication is None and self.tables:  # its own publication: keep it whole
            watch = asyncio.create_task(self._watch_publication(publication))
        try:
            while True:
                for payload in await stream.next():
                    for out in changes.feed(decode(payload)):
                        if isinstance(out, TransactionEnd):
                            stream.flushed(out.end_lsn)
                            continue
                        lag = max((datetime.now(UTC) - out.commit_time).total_seconds(), 0.0)
                        try:
                            await sink.publish(self.event(out), lag_s=lag)
                        except EventTooLarge as e:
                            # Retrying cannot make it fit, and a stalled slot keeps WAL: the
                            # change goes out with its key only, saying why (same id).
                            log.warning("a change is too large for the bus; published with"
                                        " its key only", trigger=self.name, table=out.table,
                                        key=out.key, limit=e.limit)  # fmt: skip
                            await sink.publish(self.event(out, too_large=str(e)), lag_s=lag)
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await stream.stop()

    async def _watch_publication(self, publication: str) -> None:
        """Every `PUBLICATION_CHECK_S`, put a declared table dropped and created again back.

        A dropped table leaves the publication, and one created again under its name is
        not in it: its changes were skipped without a word, and stayed skipped after a
        restart too. Each time is logged as an error, since the changes in between are lost.
        """
        gone: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(PUBLICATION_CHECK_S)
            try:
                await asyncio.to_thread(self._check_publication, publication, gone)
            except (TriggerUnavailable, OSError) as e:  # the stream reports a lost server
                log.debug("the publication could not be checked", trigger=self.name, error=str(e))
            except Exception as e:  # psycopg2.Error: the next check tries again
                log.warning("the publication could not be checked", trigger=self.name,
                            error=str(e))  # fmt: skip

    def _check_publication(self, publication: str, gone: set[tuple[str, str]]) -> None:
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    (publication,),
                )
                has = {(s, t) for s, t in cur.fetchall()}
                missing = [t for t in self.tables if t not in has]
                if not missing:
                    gone.clear()
                    return
                present = []
                for schema, table in self.tables:
                    cur.execute("SELECT to_regclass(%s)", (f'"{schema}"."{table}"',))
                    if cur.fetchone()[0] is not None:
                        present.append((schema, table))
                back = [t for t in missing if t in present]
                if back:
                    listed = ", ".join(f'"{s}"."{t}"' for s, t in present)
                    cur.execute(f'ALTER PUBLICATION "{publication}" SET TABLE {listed}')
                    gone.difference_update(back)
                    log.error(
                        "a captured table was dropped and created again: it is captured"
                        " again from now; its changes in between were not captured",
                        trigger=self.name, tables=[".".join(t) for t in back],
                    )  # fmt: skip
                new = [t for t in missing if t not in present and t not in gone]
                if new:
                    gone.update(new)
                    log.error(
                        "a captured table no longer exists (dropped or renamed): nothing of"
                        " it is captured until a table of that name is back",
                        trigger=self.name, tables=[".".join(t) for t in new],
                    )  # fmt: skip
        finally:
            conn.close()

    async def _note_slot(self, sink: Sink, slot: str, created: str | None) -> None:
        """Say loudly when the slot had to be created again: what it held is lost.

        Someone dropped it (or max_slot_wal_keep_size invalidated it) while the trigger
        was away or between two connections; the new slot starts at the server's current
        position. The cursor records that this trigger streamed from the slot before.
        """
        if sink.store is None:
            return
        cursor = await sink.cursor()
        had = isinstance(cursor, dict) and cursor.get("slot") == slot
        if created is not None and had:
            log.error(
                "the replication slot was gone and is created again: changes committed"
                " while it was gone were not captured",
                trigger=self.name, slot=slot, since=cursor.get("created"), now=created,
                fix="find who dropped it (server log), or raise max_slot_wal_keep_size;"
                " reload what changed from the table itself",
            )  # fmt: skip
        if created is not None or not had:
            await sink.save_cursor({"slot": slot, "created": created})

    def event(self, change: RowChange, *, too_large: str | None = None) -> Event:
        """The event of one row change; its id names the commit and the change's place.

        With `too_large` (why the bus refused the full event), `before` and `after` keep
        only the key, and `too_large` says why: read the row by its key.
        """
        lsn = format_lsn(change.commit_lsn)
        time = change.commit_time.isoformat(timespec="microseconds").replace("+00:00", "Z")
        before, after = change.before, change.after
        if too_large is not None:
            key = change.key or {}
            before = None if before is None else {k: v for k, v in before.items() if k in key}
            after = None if after is None else {k: v for k, v in after.items() if k in key}
        data = {
            "schema": change.schema,
            "table": change.table,
            "op": change.op,
            "before": before,
            "after": after,
            "key": change.key,
            "unchanged_toast": list(change.unchanged_toast),
            "lsn": lsn,
            "commit_time": time,
            "xid": change.xid,
            "position": change.position,
        }
        if too_large is not None:
            data["too_large"] = too_large
        subject = None
        if change.key is not None:
            subject = f"{change.schema}.{change.table}/" + "/".join(
                str(v) for v in change.key.values()
            )
            if len(subject) > MAX_SUBJECT or not survives_the_wire(subject):
                # A key with a line break, an edge space or over 1,024 characters: the bus
                # refused the event on every try and the slot stalled. Its hash still keeps
                # one row's changes on one partition.
                subject = "sha256:" + hashlib.sha256(subject.encode()).hexdigest()
        return Event.create(
            f"{self.prefix}.{_TOKEN_BAD.sub('_', change.table)}.{change.op}",
            data,
            source=f"/triggers/{self.name}",
            id=source_id(self.name, lsn, change.position),
            subject=subject,
            time=time,
        )

    def _connect(self) -> Any:
        import psycopg2

        try:
            return psycopg2.connect(self.url, connect_timeout=max(1, int(self.connect_timeout_s)))
        except psycopg2.OperationalError as e:
            raise self._unreachable(e) from e

    def _unreachable(self, error: Exception) -> TriggerUnavailable:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return TriggerUnavailable(
            f"trigger {self.name!r} cannot reach PostgreSQL at {_where(self.url)}: {first};"
            " start the server or correct the trigger's URL (retried until it answers)"
        )

    def _prepare(
        self, slot: str, publication: str
    ) -> tuple[dict[tuple[str, str], tuple[str, ...]], str | None]:
        """Check the server, create what is missing.

        The tables' primary keys, and the slot's starting LSN where this call created it.
        """
        import psycopg2
        from psycopg2 import errors

        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SHOW wal_level")
                level = cur.fetchone()[0]
                if level != "logical":
                    raise TriggerUnavailable(
                        f"trigger {self.name!r}: PostgreSQL at {_where(self.url)} has"
                        f" wal_level = {level}, and change data capture needs logical:"
                        f" {WAL_LEVEL_FIX}"
                    )
                self._check_tables(cur)
                self._ensure_publication(cur, publication)
                cur.execute(
                    "SELECT plugin, database, current_database() FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (slot,),
                )
                found = cur.fetchone()
                created: str | None = None
                if found is None:
                    with contextlib.suppress(errors.DuplicateObject):  # another worker won
                        cur.execute(
                            "SELECT lsn::text FROM"
                            " pg_create_logical_replication_slot(%s, 'pgoutput')",
                            (slot,),
                        )
                        created = str(cur.fetchone()[0])
                        log.info("created the replication slot", trigger=self.name, slot=slot)
                elif found[0] != "pgoutput" or found[1] != found[2]:
                    raise TriggerUnavailable(
                        f"trigger {self.name!r}: replication slot {slot!r} exists for plugin"
                        f" {found[0]!r} in database {found[1]!r}, not pgoutput here: drop it"
                        f" (SELECT pg_drop_replication_slot('{slot}')) or give the trigger"
                        " another slot="
                    )
                return self._primary_keys(cur, publication), created
        except psycopg2.errors.InsufficientPrivilege as e:
            raise TriggerUnavailable(f"trigger {self.name!r}: {_first(e)}; {PRIVILEGE_FIX}") from e
        except psycopg2.OperationalError as e:
            raise self._unreachable(e) from e
        except psycopg2.Error as e:
            raise TriggerUnavailable(f"trigger {self.name!r}: PostgreSQL said: {_first(e)}") from e
        finally:
            conn.close()

    def _check_tables(self, cur: Any) -> None:
        for schema, table in self.tables:
            cur.execute("SELECT to_regclass(%s)", (f'"{schema}"."{table}"',))
            if cur.fetchone()[0] is None:
                raise TriggerUnavailable(
                    f"trigger {self.name!r}: table {schema}.{table} does not exist in"
                    f" {_where(self.url)}: create it, or correct tables="
                )
            if self.old_rows and _identity(cur, schema, table) != "f":
                log.warning(
                    "old rows are wanted but the table's replica identity is not FULL:"
                    " `before` holds only the key",
                    trigger=self.name, table=f"{schema}.{table}",
                    fix=f'ALTER TABLE "{schema}"."{table}" REPLICA IDENTITY FULL',
                )  # fmt: skip

    def _ensure_publication(self, cur: Any, publication: str) -> None:
        from psycopg2 import errors

        cur.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        )
        has = {(s, t) for s, t in cur.fetchall()}
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        exists = cur.fetchone() is not None
        if self.publication is not None:  # declared: the user's, never changed here
            if not exists:
                tables = ", ".join(".".join(t) for t in self.tables) or "your_table"
                raise TriggerUnavailable(
                    f"trigger {self.name!r}: publication {publication!r} does not exist:"
                    f" CREATE PUBLICATION {publication} FOR TABLE {tables}; or leave"
                    " publication= unset and the trigger keeps its own"
                )
            return
        listed = ", ".join(f'"{s}"."{t}"' for s, t in self.tables)
        if not exists:
            with contextlib.suppress(errors.DuplicateObject):  # another worker won
                cur.execute(f'CREATE PUBLICATION "{publication}" FOR TABLE {listed}')
                log.info("created the publication", trigger=self.name, publication=publication)
        elif has != set(self.tables):  # the declaration changed: follow it
            cur.execute(f'ALTER PUBLICATION "{publication}" SET TABLE {listed}')
            log.info("updated the publication's tables", trigger=self.name, tables=listed)

    def _primary_keys(self, cur: Any, publication: str) -> dict[tuple[str, str], tuple[str, ...]]:
        cur.execute(
            "SELECT n.nspname, c.relname, array_agg(a.attname ORDER BY k.ord)"
            " FROM pg_publication_tables p"
            " JOIN pg_namespace n ON n.nspname = p.schemaname"
            " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename"
            " JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum"
            " WHERE p.pubname = %s GROUP BY n.nspname, c.relname",
            (publication,),
        )
        return {(s, t): tuple(cols) for s, t, cols in cur.fetchall()}

    # -- tidings doctor

    def diagnose(self, app: str) -> list[Finding]:
        """wal_level, the tables' replica identity and the slot's lag, each with its fix."""
        import psycopg2

        title = f"trigger {self.name}: PostgreSQL"
        try:
            conn = self._connect()
        except TriggerUnavailable as e:
            return [Finding(False, title, [str(e)])]
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                return self._diagnose(cur, app)
        except psycopg2.Error as e:
            return [Finding(False, title, [f"PostgreSQL said: {_first(e)}"])]
        finally:
            conn.close()

    def _diagnose(self, cur: Any, app: str) -> list[Finding]:
        name = f"trigger {self.name}"
        found: list[Finding] = []
        cur.execute("SHOW wal_level")
        level = cur.fetchone()[0]
        if level == "logical":
            found.append(Finding(True, f"{name}: wal_level", [f"logical at {_where(self.url)}"]))
        else:
            found.append(
                Finding(False, f"{name}: wal_level", [f"{level}, not logical"], WAL_LEVEL_FIX)
            )
        tables = list(self.tables)
        if not tables and self.publication is not None:
            cur.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,),
            )
            tables = [(s, t) for s, t in cur.fetchall()]
        for schema, table in tables:
            found.append(self._identity_finding(cur, schema, table))
        found.append(self._lag_finding(cur, self.slot_for(app)))
        return found

    def _identity_finding(self, cur: Any, schema: str, table: str) -> Finding:
        title = f"trigger {self.name}: replica identity of {schema}.{table}"
        quoted = f'"{schema}"."{table}"'
        identity = _identity(cur, schema, table)
        if identity is None:
            return Finding(
                False, title, ["the table does not exist"], "create it or correct tables="
            )
        full = f"ALTER TABLE {quoted} REPLICA IDENTITY FULL"
        cur.execute(
            "SELECT 1 FROM pg_index WHERE indrelid = to_regclass(%s) AND indisprimary", (quoted,)
        )
        has_key = cur.fetchone() is not None
        if identity == "f":
            return Finding(True, title, ["FULL: `before` holds the whole old row"])
        if identity == "n" or (identity == "d" and not has_key):
            return Finding(
                None,
                title,
                [
                    "no replica identity: PostgreSQL refuses UPDATE and DELETE on the table"
                    " while it is published"
                ],
                f"add a primary key, or {full}",
            )
        if self.old_rows:
            return Finding(
                None, title, ["old rows are wanted, but `before` holds the key only"], full
            )
        what = "the primary key" if identity == "d" else "a unique index"
        return Finding(True, title, [f"{what}: `before` holds the key only (FULL for the row)"])

    def _lag_finding(self, cur: Any, slot: str) -> Finding:
        title = f"trigger {self.name}: replication slot {slot}"
        cur.execute(
            "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn),"
            " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
        if row is None:
            return Finding(
                None, title, ["not created yet: the trigger creates it on its first start"]
            )
        active, behind, flushed = row
        behind = int(behind or 0)
        details = [
            f"{_bytes(behind)} behind the server's WAL (flushed to {flushed}),"
            f" {'streaming now' if active else 'no trigger streaming from it now'}"
        ]
        if behind <= self.max_lag_bytes:
            return Finding(True, title, details)
        return Finding(
            None,
            title,
            [*details, "PostgreSQL keeps all WAL the slot has not confirmed: the disk fills up"],
            "start the app's workers so the trigger catches up; if the trigger is gone for good,"
            f" drop its slot: SELECT pg_drop_replication_slot('{slot}')",
        )


def _identity(cur: Any, schema: str, table: str) -> str | None:
    cur.execute(
        "SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)", (f'"{schema}"."{table}"',)
    )
    row = cur.fetchone()
    return None if row is None else str(row[0])


def _qualified(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return (schema or "public", name)


def _where(url: str) -> str:
    """Host, port and database of a URL, without credentials."""
    parts = urlsplit(url)
    if not parts.scheme:  # a libpq key=value string: show no password
        return re.sub(r"password=\S+", "password=***", url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


def _first(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _app_of(client: Client) -> str:
    """The app a client publishes for (`app.client()` uses the source ``/<app>``)."""
    return client.source.strip("/").split("/")[0] or "tidings"


# -- the driver: psycopg2's blocking stream in a thread --------------------------------------


class _Stream:
    """Reads the slot in a thread; hands payloads to the loop; reports what was flushed.

    The thread alone touches the replication connection (psycopg2 connections are not
    shared across threads): the loop only moves `_flush` forward, and the thread sends it.
    Payloads go over in batches of what has arrived (at most `BATCH`), and about
    `max_in_flight` wait in the loop at most, so a slow bus slows the stream.
    """

    def __init__(
        self, trigger: PostgresChanges, slot: str, publication: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.trigger = trigger
        self.slot = slot
        self.publication = publication
        self.loop = loop
        self.queue: asyncio.Queue[list[bytes] | BaseException] = asyncio.Queue()
        self._batch = max(1, min(BATCH, trigger.max_in_flight))
        self._room = threading.Semaphore(max(1, trigger.max_in_flight // self._batch))
        self._stop = threading.Event()
        self._flush = 0
        self._streaming = False  # past start_replication: a driver error now means a lost stream
        self._thread = threading.Thread(target=self._main, name=f"cdc {trigger.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def next(self) -> list[bytes]:
        """The next pgoutput messages, in stream order; raises what ended the stream."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        self._room.release()
        return item

    def flushed(self, lsn: int) -> None:
        """Everything up to `lsn` is on the bus: the thread may report it to the server."""
        self._flush = max(self._flush, lsn)

    async def stop(self) -> None:
        """End the thread, which reports the last flushed position first."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 10)

    def _hand(self, item: list[bytes] | BaseException, cur: Any = None) -> bool:
        """Give `item` to the loop once there is room; False if the stream is stopping.

        While it waits (a slow bus), `cur` still reports to the server every status
        interval, which keeps the server from dropping a reader that seems gone.
        """
        waited = 0.0
        while not self._stop.is_set():
            if isinstance(item, BaseException) or self._room.acquire(timeout=POLL_S):
                try:
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    return False
                return True
            waited += POLL_S
            if cur is not None and waited >= self.trigger.status_interval_s:
                cur.send_feedback(force=True)
                waited = 0.0
        return False

    def _main(self) -> None:
        import psycopg2

        try:
            self._stream()
        except psycopg2.Error as e:
            if self._streaming or isinstance(e, psycopg2.OperationalError):
                # A restart or crash of the server ends the stream with whichever error
                # libpq meets first ("server closed the connection", "no COPY in progress").
                lost = TriggerUnavailable(
                    f"trigger {self.trigger.name!r} lost its replication stream from"
                    f" {_where(self.trigger.url)}: {_first(e)}; started again until the"
                    " server answers"
                )
                self._hand(lost)
            else:
                self._hand(self._refused(e))
        except Exception as e:
            self._hand(e)

    def _refused(self, error: Exception) -> TriggerUnavailable:
        text = _first(error)
        if "is active for PID" in text:
            text += " (another worker streams from this slot; this one takes over if it stops)"
        elif "can no longer get changes" in text or "has been invalidated" in text:
            text += (
                f" (it held back more WAL than max_slot_wal_keep_size allows): drop it with"
                f" SELECT pg_drop_replication_slot('{self.slot}'); the next start makes a new"
                " one, which captures changes from then on"
            )
        return TriggerUnavailable(f"trigger {self.trigger.name!r}: PostgreSQL said: {text}")

    def _stream(self) -> None:
        import psycopg2
        from psycopg2.extras import LogicalReplicationConnection

        trigger = self.trigger
        timeout = max(1, int(trigger.connect_timeout_s))
        conn = psycopg2.connect(
            trigger.url, connection_factory=LogicalReplicationConnection, connect_timeout=timeout
        )
        try:
            cur = conn.cursor()
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                options={"proto_version": "1", "publication_names": f'"{self.publication}"'},
                status_interval=trigger.status_interval_s,  # type: ignore[arg-type]  # a float
            )
            self._streaming = True
            sent, open_txn, last_end = 0, False, 0
            batch: list[bytes] = []
            while not self._stop.is_set():
                flush = self._flush
                if not open_txn and flush >= last_end and cur.wal_end > flush:
                    # Nothing of ours is pending: what the server has sent since holds no
                    # change for us (keepalives), so the slot may move up to it.
                    flush = cur.wal_end
                if flush > sent:
                    cur.send_feedback(flush_lsn=flush)  # type: ignore[no-untyped-call]
                    sent = flush
                message = cur.read_message()
                if message is not None:
                    payload: bytes = message.payload
                    if payload[:1] == b"B":
                        open_txn = True
                    elif payload[:1] == b"C":
                        open_txn, last_end = False, struct.unpack_from(">Q", payload, 10)[0]
                    batch.append(payload)
                    if len(batch) < self._batch:
                        continue
                if batch:  # full, or nothing more has arrived: hand what there is now
                    if not self._hand(batch, cur):
                        break
                    batch = []
                    continue
                select.select([conn], [], [], POLL_S)
            if self._flush > sent:
                cur.send_feedback(flush_lsn=self._flush, force=True)  # type: ignore[no-untyped-call]
        finally:
            conn.close()
