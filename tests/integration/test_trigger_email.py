"""The SMTP trigger on a real nats-server, sent to with smtplib: 250 only after the bus.

The bus is killed while 50 mails arrive (each refused with 451, then accepted once it is
back: exactly 50 events); attachments land under the home by sha256; a mail over the
size limit is refused with 552 and publishes nothing; AUTH is required when declared.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.conftest import NatsServer, free_port
from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Settings
from tidings.client import Client
from tidings.errors import ConfigError
from tidings.events import Event, decode
from tidings.triggers.base import Runner, Sink, TriggerStatus, TriggerUnavailable, source_id
from tidings.triggers.email import EmailTrigger, html_to_text
from tidings.worker import Worker

pytestmark = pytest.mark.nats


@asynccontextmanager
async def listening(trigger: EmailTrigger, settings: Settings) -> AsyncIterator[Runner]:
    """The trigger run by its `Runner` on a client of `settings`, once it is bound."""
    async with Client(settings) as client:
        runner = Runner(trigger, client)
        runner.start()
        try:
            await asyncio.wait_for(trigger.listening(), 20)
            yield runner
        finally:
            await runner.stop()


async def stored_events(nats_url: str, namespace: str, type_: str) -> list[Event]:
    """Every event of `type_` in the namespace's stream, repeats included, in order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream = f"{namespace.upper()}_EVENTS"
        subject = f"{namespace}.events.{type_}"
        info = await js.stream_info(stream, subjects_filter=subject)
        total = sum((info.state.subjects or {}).values())
        events: list[Event] = []
        if total == 0:
            return events
        sub = await js.subscribe(subject, ordered_consumer=True)
        try:
            while len(events) < total:
                msg = await sub.next_msg(timeout=10)
                events.append(decode(msg.headers, msg.data))
        finally:
            await sub.unsubscribe()
        return events
    finally:
        await nc.close()


def mail(n: int, *, message_id: bool = True, size: int = 0) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@example.org"
    message["To"] = "inbox@example.org"
    message["Subject"] = f"mail {n}"
    if message_id:
        message["Message-ID"] = f"<mail-{n}@example.org>"
    message.set_content(f"body of mail {n}\n" + ("x" * 69 + "\n") * (size // 70))
    return message


def send(port: int, message: EmailMessage, **login: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        if login:
            smtp.login(login["user"], login["password"])
        smtp.send_message(message)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server for this test alone, with its data on disk: it gets killed."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.slow
@pytest.mark.chaos
async def test_fifty_mails_while_the_bus_is_down_are_refused_451_then_exactly_fifty_events(
    own_nats: NatsServer, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(own_nats.url, namespace, tmp_path)
    trigger = EmailTrigger("inbox", port=0, publish_timeout=5)
    async with listening(trigger, settings) as runner:
        # One mail first: the stream exists and the client is connected.
        await asyncio.to_thread(send, trigger.port, mail(0))
        own_nats.stop(kill=True)
        down_at = time.monotonic()

        refused: list[int] = []  # the 451s, over every try of every mail

        def first_pass() -> list[int]:
            """All 50 mails once, while the bus is down: each should be refused."""
            left = []
            for n in range(1, 51):
                try:
                    send(trigger.port, mail(n))
                except smtplib.SMTPResponseException as e:
                    assert e.smtp_code == 451, e
                    assert b"try again later" in e.smtp_error
                    refused.append(n)
                    left.append(n)
            return left

        left = await asyncio.to_thread(first_pass)
        assert len(refused) == 50  # the bus was down for all of them

        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - down_at)))
        own_nats.start()

        def retry(left: list[int]) -> None:
            """Each refused mail again, as a sending server would, until it is accepted."""
            deadline = time.monotonic() + 60
            while left:
                assert time.monotonic() < deadline, f"still refused: {left}"
                n = left[0]
                try:
                    send(trigger.port, mail(n))
                    left.pop(0)
                except smtplib.SMTPResponseException as e:
                    assert e.smtp_code == 451, e
                    refused.append(n)
                    time.sleep(0.2)

        await asyncio.to_thread(retry, left)
        assert runner.status.events == 51

    events = await stored_events(own_nats.url, namespace, "email.received")
    assert len(events) == 51
    expected = {source_id("inbox", f"<mail-{n}@example.org>") for n in range(51)}
    assert {e.id for e in events} == expected
    assert sorted(e.data["subject"] for e in events) == sorted(f"mail {n}" for n in range(51))


async def test_a_mail_with_attachments_carries_their_metadata_and_a_path_to_their_content(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = EmailTrigger("attached", port=0, inline_limit=1024)
    big = bytes(range(256)) * 400  # 100 KiB: referenced only
    small = b"tiny,csv\n1,2\n"  # inlined as well
    message = mail(1)
    message.add_attachment(big, maintype="application", subtype="pdf", filename="report.pdf")
    message.add_attachment(small, maintype="text", subtype="csv", filename="data.csv")
    async with listening(trigger, settings) as runner:
        await asyncio.to_thread(send, trigger.port, message)
        await asyncio.to_thread(send, trigger.port, message)  # a sender's retry: one event
        assert (runner.status.events, runner.status.duplicates) == (1, 1)

    [event] = await stored_events(nats_url, namespace, "email.received")
    assert event.id == source_id("attached", "<mail-1@example.org>")
    data = event.data
    assert data["text"].startswith("body of mail 1")
    assert data["headers"]["subject"] == "mail 1"
    assert data["envelope"]["rcpt_to"] == ["inbox@example.org"]
    pdf, csv = data["attachments"]
    assert (pdf["filename"], pdf["content_type"], pdf["size"]) == (
        "report.pdf", "application/pdf", len(big),
    )  # fmt: skip
    for meta, content in ((pdf, big), (csv, small)):
        assert meta["sha256"] == hashlib.sha256(content).hexdigest()
        path = Path(meta["path"])
        assert path.name == meta["sha256"]
        assert path.is_relative_to(settings.home_path)
        stored = await asyncio.to_thread(path.read_bytes)
        assert hashlib.sha256(stored).hexdigest() == meta["sha256"]
    assert "content_base64" not in pdf
    assert csv["content_base64"] == "dGlueSxjc3YKMSwyCg=="


async def test_an_html_only_mail_in_latin_1_gives_its_text_and_no_message_id_gives_a_hash(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = EmailTrigger("html", port=0)
    raw = (
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"<html><head><style>p{}</style></head><body><p>Gr=FC=DFe</p>"
        b"<p>a&amp;b<br>end</p></body></html>\r\n"
    )

    def send_raw() -> None:
        with smtplib.SMTP("127.0.0.1", trigger.port, timeout=30) as smtp:
            smtp.sendmail("a@example.org", ["b@example.org"], raw)

    async with listening(trigger, settings):
        await asyncio.to_thread(send_raw)
    [event] = await stored_events(nats_url, namespace, "email.received")
    assert event.data["subject"] == "café"
    assert event.data["text"] == "Grüße\na&b\nend"
    assert event.data["text_from_html"] is True
    assert event.data["message_id"] is None
    assert event.id == source_id("html", "sha256:" + hashlib.sha256(raw).hexdigest())
    assert html_to_text("<ul><li>one</li><li>two</li></ul><script>x()</script>") == "one\ntwo"


async def test_a_mail_over_the_size_limit_is_refused_552_and_publishes_nothing(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = EmailTrigger("small", port=0, max_size=20_000)
    too_big = mail(1, size=40_000)
    async with listening(trigger, settings) as runner:

        def refusals() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", trigger.port, timeout=30) as smtp:
                # smtplib declares SIZE: refused at MAIL FROM already.
                try:
                    smtp.send_message(too_big)
                except smtplib.SMTPResponseException as e:
                    codes.append(e.smtp_code)
                # A sender that declares no size: refused at the end of DATA.
                smtp.ehlo()
                smtp.mail("sender@example.org")
                smtp.rcpt("inbox@example.org")
                code, _ = smtp.data(too_big.as_string())  # CRLF line ends
                codes.append(code)
                # The session goes on: a mail within the limit is accepted.
                smtp.send_message(mail(2))
            return codes

        assert await asyncio.to_thread(refusals) == [552, 552]
        assert runner.status.events == 1
    events = await stored_events(nats_url, namespace, "email.received")
    assert [e.data["subject"] for e in events] == ["mail 2"]


async def test_auth_is_required_when_declared_and_wrong_credentials_are_refused(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = EmailTrigger("secured", port=0, credentials={"alice": "s3cret"})
    async with listening(trigger, settings) as runner:

        def attempts() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            try:
                send(trigger.port, mail(1))
            except smtplib.SMTPResponseException as e:
                seen["anonymous"] = e.smtp_code
            try:
                send(trigger.port, mail(2), user="alice", password="wrong")
            except smtplib.SMTPAuthenticationError as e:
                seen["wrong"] = e.smtp_code
            send(trigger.port, mail(3), user="alice", password="s3cret")
            return seen

        assert await asyncio.to_thread(attempts) == {"anonymous": 530, "wrong": 535}
        assert runner.status.events == 1
    [event] = await stored_events(nats_url, namespace, "email.received")
    assert event.data["subject"] == "mail 3"
    # Beyond loopback, AUTH without TLS would send passwords in the clear.
    with pytest.raises(ConfigError, match="tls_context"):
        EmailTrigger("open", host="0.0.0.0", credentials={"alice": "s3cret"})


async def test_a_port_in_use_is_a_trigger_unavailable_naming_the_fix(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        trigger = EmailTrigger("busy", port=port)
        async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
            sink = Sink(client, TriggerStatus("busy", "email"))
            with pytest.raises(TriggerUnavailable, match="already in use") as caught:
                await trigger.run(sink)
    assert "EmailTrigger(port=...)" in str(caught.value)


async def test_a_worker_runs_the_declared_trigger_and_an_agent_reacts_to_the_mail(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("mailroom")
    inbox = app.trigger(EmailTrigger("inbox", port=0))

    @app.agent("triage", on="email.received")
    async def triage(event: Event, ctx: Context) -> dict[str, Any]:
        return {"subject": event.data["subject"], "files": len(event.data["attachments"])}

    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        await asyncio.wait_for(inbox.listening(), 20)
        await asyncio.to_thread(send, inbox.port, mail(7))
        store = worker.store
        assert store is not None

        async def decided() -> bool:
            return bool(await store.list_decisions("triage"))

        await eventually(decided, message="the agent's decision")
        [decision] = await store.list_decisions("triage")
        assert decision.result == {"subject": "mail 7", "files": 0}
        assert decision.event_id == source_id("inbox", "<mail-7@example.org>")
        status = worker.triggers["inbox"].status
        assert (status.kind, status.events, status.state) == ("email", 1, "running")


def docs_section(title: str) -> tuple[str, str, str]:
    """The page's path, and the first Python and bash blocks of its section `title`.

    The Python block keeps its place in the page (blank lines before it), so tracebacks
    and `inspect.getsource` (an agent's code version) read the page's own lines.
    """
    page = Path(__file__).resolve().parents[2] / "docs" / "triggers.md"
    text = page.read_text()
    start = text.index(f"\n## {title}\n")
    section = text[start:].split("\n## ", 2)[1]
    python = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    bash = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert python is not None and bash is not None
    before = text[: start + text[start:].index(python.group(0))].count("\n") + 1
    return str(page), "\n" * before + python.group(1), bash.group(1)


async def test_the_docs_example_runs_and_the_smtplib_line_sends_to_it(
    nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page, code, shell = docs_section("Email (SMTP)")
    port = free_port()
    monkeypatch.setenv("MAIL_PORT", str(port))
    scope: dict[str, Any] = {"__name__": "docs_triggers_email"}
    exec(compile(code, page, "exec"), scope)
    app = scope["app"]
    assert isinstance(app, App)
    command = shell[shell.index("python -c") : shell.index("tidings tail")]
    command = command.replace("python -c", f"{sys.executable} -c").replace("8025", str(port))
    async with running(app, settings_for(nats_url, namespace, tmp_path)) as worker:
        inbox = app.triggers["inbox"]
        assert isinstance(inbox, EmailTrigger)
        await asyncio.wait_for(inbox.listening(), 20)
        await asyncio.to_thread(subprocess.run, ["bash", "-c", command], check=True, timeout=60)
        store = worker.store
        assert store is not None

        async def decided() -> bool:
            return bool(await store.list_decisions("triage"))

        await eventually(decided, message="the agent's decision")
        [decision] = await store.list_decisions("triage")
    assert decision.result == {"subject": "refund", "attachments": 0}
    assert decision.event_id == source_id("inbox", "<1@example.org>")


@pytest.mark.slow
async def test_of_two_workers_one_listens_and_the_other_takes_the_port_over_when_it_stops(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()

    def declare() -> tuple[App, EmailTrigger]:
        app = App("mailroom")
        return app, app.trigger(EmailTrigger("inbox", port=port, lease_ttl=2))

    (first_app, first), (second_app, second) = declare(), declare()
    settings = settings_for(nats_url, namespace, tmp_path)
    holder = Worker(first_app, settings)
    await holder.start()
    stopped = False
    try:
        await asyncio.wait_for(first.listening(), 20)
        async with running(second_app, settings) as standby:
            waiting = standby.triggers["inbox"]
            await eventually(lambda: waiting.status.state == "standby", message="standby")
            await asyncio.to_thread(send, port, mail(1))
            await holder.stop(grace=5)  # releases the lease: the standby takes over
            stopped = True
            await asyncio.wait_for(second.listening(), 20)
            assert waiting.status.state == "running"
            await asyncio.to_thread(send, port, mail(2))
            assert waiting.status.events == 1
    finally:
        if not stopped:
            await holder.stop(grace=5)
    events = await stored_events(nats_url, namespace, "email.received")
    assert sorted(e.data["subject"] for e in events) == ["mail 1", "mail 2"]


async def test_raw_utf8_headers_and_a_forwarded_mail_are_accepted_250_and_kept(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """8-bit header bytes were surrogates the bus could not encode: 451 on every retry.

    And AUTH was offered with no credentials declared, so a sender set up to log in failed.
    """
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = EmailTrigger("intl", port=0)
    eight_bit = (  # raw UTF-8, then one byte that is no UTF-8 at all
        "From: Jérôme <j@example.org>\r\nTo: b@example.org\r\nSubject: café ".encode()
        + b"\xff\r\nMessage-ID: <utf8@example.org>\r\n\r\nbonjour\r\n"
    )
    forwarded = (
        b"From: a@example.org\r\nSubject: fwd\r\nMessage-ID: <fwd@example.org>\r\n"
        b"Content-Type: multipart/mixed; boundary=Q\r\n\r\n--Q\r\n"
        b"Content-Type: text/plain\r\n\r\nsee attached\r\n--Q\r\n"
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename=orig.eml"
        b"\r\n\r\nFrom: c@example.org\r\nSubject: inner\r\n"
        b"Content-Type: multipart/mixed; boundary=R\r\n\r\n--R\r\n"
        b"Content-Type: text/plain\r\n\r\ninner body\r\n--R\r\nContent-Type: application/pdf"
        b"\r\nContent-Disposition: attachment; filename=x.pdf\r\n\r\nPDF\r\n--R--\r\n--Q--\r\n"
    )

    def send_raw() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", trigger.port, timeout=30) as smtp:
            smtp.ehlo()
            for raw in (eight_bit, forwarded):
                smtp.mail("a@example.org")
                smtp.rcpt("b@example.org")
                codes.append(smtp.data(raw)[0])
        return codes

    def features() -> dict[str, str]:
        with smtplib.SMTP("127.0.0.1", trigger.port, timeout=30) as smtp:
            smtp.ehlo()
            return dict(smtp.esmtp_features)

    async with listening(trigger, settings):
        assert await asyncio.to_thread(send_raw) == [250, 250]
        assert "auth" not in await asyncio.to_thread(features)  # no credentials declared
    first, second = await stored_events(nats_url, namespace, "email.received")
    assert first.data["subject"] == "café \ufffd"
    assert first.data["from"] == "Jérôme <j@example.org>"
    assert second.data["text"] == "see attached"
    [attachment] = second.data["attachments"]  # the forwarded mail, not its inner pdf
    assert (attachment["filename"], attachment["content_type"]) == ("orig.eml", "message/rfc822")
    assert b"inner body" in await asyncio.to_thread(Path(attachment["path"]).read_bytes)
