"""An SMTP listener (aiosmtpd) whose mails are `email.received` events.

The mail is answered 250 only once the bus confirmed its event, and 451 while the bus
is down or the publish fails, so the sending server keeps it and tries again (guarantee
3). The id is `source_id(name, Message-ID)` (or the sha256 of the raw message when it
has none), so a retried mail is the same event (guarantees 1 and 2).

Attachments are written to a folder under the home, named by their sha256, and the
event carries their metadata and path (small ones inlined up to `inline_limit`): the
bus carries at most 1 MiB, a mail up to `max_size`.

AUTH (PLAIN, LOGIN) is required once `credentials` are declared. Following aiosmtpd's
rule that passwords never cross the network in the clear, AUTH is offered without TLS
only on a loopback address; any other address needs a `tls_context` (STARTTLS, then
AUTH), else the declaration is refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Mapping
from email import policy
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import structlog

from tidings.errors import ConfigError, EventTooLarge, MalformedEvent
from tidings.events import Event, check_type
from tidings.triggers.base import LEASE_TTL_S, Sink, Trigger, TriggerUnavailable, source_id

try:
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ImportError as e:  # pragma: no cover - the extra is part of dev
    raise ImportError('the email trigger needs aiosmtpd: pip install "tidings[email]"') from e

log = structlog.get_logger("tidings.triggers.email")

DEFAULT_PORT = 8025  # aiosmtpd's usual port: 25 needs root
MAX_SIZE = 10 * 1024 * 1024  # a mail larger than this is refused with 552
INLINE_LIMIT = 16 * 1024  # attachments up to this size also travel base64 in the event
INLINE_TOTAL = 256 * 1024  # inlined bytes per mail, so the event stays under the bus limit
MAX_TEXT = 256 * 1024  # characters of text in the event; the rest is cut (text_truncated)
PUBLISH_TIMEOUT_S = 30.0  # a bus that has not confirmed by then: 451, the sender retries


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmailTrigger(Trigger):
    """Listens for SMTP on `host`:`port` (port 0: any free one, see `port` once bound)."""

    kind = "email"

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        type: str = "email.received",
        folder: str | Path | None = None,
        max_size: int = MAX_SIZE,
        inline_limit: int = INLINE_LIMIT,
        max_text: int = MAX_TEXT,
        credentials: Mapping[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        hostname: str | None = None,
        publish_timeout: float = PUBLISH_TIMEOUT_S,
        lease_ttl: float = LEASE_TTL_S,
    ) -> None:
        super().__init__(name)
        if credentials and tls_context is None and not _is_loopback(host):
            raise ConfigError(
                f"email trigger {name!r}: AUTH on {host} without TLS would send passwords in"
                " the clear; pass tls_context= (STARTTLS before AUTH) or listen on loopback"
            )
        self.host = host
        self.port = port
        self.type = check_type(type)
        self.folder = Path(folder) if folder is not None else None
        self.max_size = max_size
        self.inline_limit = inline_limit
        self.max_text = max_text
        self.credentials = dict(credentials or {})
        self.tls_context = tls_context
        self.hostname = hostname
        self.publish_timeout = publish_timeout
        self.lease_ttl = lease_ttl  # a standby takes the port over within this after a death
        self._listening: asyncio.Event | None = None

    def describe(self) -> dict[str, Any]:
        """The address, the event type, the limits and whether AUTH is required."""
        return {
            "listen": f"{self.host}:{self.port}",
            "type": self.type,
            "max_size": self.max_size,
            "auth": bool(self.credentials),
            "tls": self.tls_context is not None,
        }

    async def listening(self) -> tuple[str, int]:
        """Wait until the listener is bound; its address (the real port when 0 was asked)."""
        if self._listening is None:
            self._listening = asyncio.Event()
        await self._listening.wait()
        return self.host, self.port

    def attachments_folder(self, sink: Sink) -> Path:
        """Where attachments are written: `folder`, relative to the home unless absolute."""
        home = sink.client.settings.home_path
        if self.folder is None:
            return home / "triggers" / self.name / "attachments"
        return self.folder if self.folder.is_absolute() else home / self.folder

    async def run(self, sink: Sink) -> None:
        """Serve SMTP until cancelled; each mail is published before it is answered 250.

        One worker listens at a time (the trigger's lease, where the runner has a store):
        the others stand by and take the port over within the lease's ttl.
        """
        async with one_worker(sink, self.lease_ttl):
            await self._serve(sink)

    async def _serve(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self, sink, self.attachments_folder(sink))
        hostname = self.hostname or socket.gethostname()
        sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

        def protocol() -> SMTP:
            with warnings.catch_warnings():
                # aiosmtpd warns about AUTH without TLS; we allow it on loopback only.
                warnings.simplefilter("ignore")
                smtp = SMTP(
                    handler,
                    data_size_limit=self.max_size,
                    hostname=hostname,
                    ident="Tidings",
                    tls_context=self.tls_context,
                    require_starttls=self.tls_context is not None and bool(self.credentials),
                    auth_required=bool(self.credentials),
                    # Without credentials AUTH is not offered (only ever after TLS): a
                    # sender set up to log in would try, fail and keep the mail.
                    auth_require_tls=self.tls_context is not None or not self.credentials,
                    authenticator=self._authenticate if self.credentials else None,
                    loop=loop,
                )
            sessions.add(smtp)
            return smtp

        try:
            server = await loop.create_server(protocol, self.host, self.port)
        except OSError as e:
            raise TriggerUnavailable(self._bind_error(e)) from e
        self.port = int(server.sockets[0].getsockname()[1])
        if self._listening is None:
            self._listening = asyncio.Event()
        self._listening.set()
        log.info("listening for mail", trigger=self.name, host=self.host, port=self.port)
        try:
            await server.serve_forever()
        finally:
            self._listening.clear()
            server.close()
            for smtp in list(sessions):
                if smtp.transport is not None:
                    smtp.transport.close()

    def _bind_error(self, e: OSError) -> str:
        where = f"{self.host}:{self.port}"
        if e.errno == errno.EADDRINUSE:
            return (
                f"email trigger {self.name!r}: {where} is already in use by another process:"
                f" stop it (`ss -ltnp 'sport = :{self.port}'` names it) or choose another"
                " port (EmailTrigger(port=...))"
            )
        if e.errno == errno.EACCES:
            return (
                f"email trigger {self.name!r}: no permission to listen on {where}: use a"
                f" port above 1023 (the default is {DEFAULT_PORT}) and forward 25 to it"
            )
        return f"email trigger {self.name!r}: cannot listen on {where} ({e}): check the host"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode(errors="replace")
        expected = self.credentials.get(login)
        ok = expected is not None and hmac.compare_digest(expected.encode(), bytes(data.password))
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


def one_worker(sink: Sink, ttl_s: float) -> contextlib.AbstractAsyncContextManager[Any]:
    """The trigger's lease where the runner has a store (a worker); else nothing to hold."""
    return sink.exclusive(ttl_s) if sink.store is not None else contextlib.nullcontext()


class _Handler:
    """aiosmtpd's handler: parse, store attachments, publish, then answer."""

    def __init__(self, trigger: EmailTrigger, sink: Sink, folder: Path) -> None:
        self.trigger = trigger
        self.sink = sink
        self.folder = folder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content or b""
            raw = content if isinstance(content, bytes) else content.encode()
        trigger = self.trigger
        try:
            parsed = parse_mail(raw, max_text=trigger.max_text)
        except Exception as e:  # the parser is lenient; what it still refuses is not mail
            log.warning("a mail could not be parsed", trigger=trigger.name, error=str(e))
            return "554 5.6.0 the message could not be parsed"
        try:
            files = (
                await asyncio.to_thread(self._store, parsed.attachments)
                if parsed.attachments
                else []
            )
        except OSError as e:
            log.error("an attachment could not be written", trigger=trigger.name, error=str(e))
            return "451 4.3.0 the attachments could not be stored; try again later"
        message_id = parsed.message_id or "sha256:" + hashlib.sha256(raw).hexdigest()
        data = parsed.data
        data["envelope"] = {"mail_from": envelope.mail_from, "rcpt_to": list(envelope.rcpt_tos)}
        data["attachments"] = files
        event = Event.create(
            trigger.type,
            data,
            source=f"/triggers/{trigger.name}",
            id=source_id(trigger.name, message_id),
        )
        try:
            async with asyncio.timeout(trigger.publish_timeout):
                await self.sink.publish(event)
        except EventTooLarge as e:
            log.warning("a mail too large for the bus", trigger=trigger.name, error=str(e))
            return "552 5.3.4 message too large for the event bus: send less text"
        except (MalformedEvent, orjson.JSONEncodeError) as e:  # the same on every retry
            log.error("a mail cannot be an event", trigger=trigger.name, error=str(e))
            return "554 5.6.0 the message cannot be made an event"
        except Exception as e:
            log.warning(
                "a mail was refused: the bus did not confirm it",
                trigger=trigger.name, error=str(e) or type(e).__name__,
            )  # fmt: skip
            return "451 4.3.0 the event bus did not confirm the message; try again later"
        return f"250 2.0.0 OK {event.id}"

    def _store(self, attachments: list[tuple[dict[str, Any], bytes]]) -> list[dict[str, Any]]:
        """Write each attachment as <folder>/<sha256> (atomically); its metadata and path."""
        out = []
        inlined = 0
        for meta, content in attachments:
            path = self.folder / meta["sha256"]
            if not (path.exists() and path.stat().st_size == len(content)):
                self.folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(content)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            meta = {**meta, "path": str(path)}
            limit = self.trigger.inline_limit
            if len(content) <= limit and inlined + len(content) <= INLINE_TOTAL:
                inlined += len(content)
                meta["content_base64"] = base64.b64encode(content).decode()
            out.append(meta)
        return out


class ParsedMail:
    """What a mail becomes: the event's data, its attachments and its Message-ID."""

    def __init__(
        self,
        data: dict[str, Any],
        attachments: list[tuple[dict[str, Any], bytes]],
        message_id: str | None,
    ) -> None:
        self.data = data
        self.attachments = attachments
        self.message_id = message_id


# The stdlib's structured header classes cost about a millisecond per mail (addresses,
# dates); only the MIME headers that finding the body and attachments reads need them.
_STRUCTURED = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
_REGISTRY = HeaderRegistry()


@functools.lru_cache(maxsize=512)
def _structured(name: str, value: str) -> Any:
    """Parsed once: the same Content-Type is read many times while the body is found."""
    return _REGISTRY(name, value)


def _header(name: str, value: str) -> Any:
    if name.lower() in _STRUCTURED:
        return _structured(name, value)
    value = _unescape(value)
    if "=?" not in value:
        return value
    try:
        return _unescape(str(make_header(decode_header(value))))  # RFC 2047 encoded words
    except (LookupError, UnicodeError, ValueError):
        return value


def _unescape(value: str) -> str:
    """Raw 8-bit header bytes (kept by the parser as surrogates) read as UTF-8, else U+FFFD.

    Raw UTF-8 headers are common (RFC 6532); left as surrogates they cannot be encoded,
    so the mail would be refused 451 on every retry of the sending server.
    """
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_POLICY = policy.default.clone(header_factory=_header)


def parse_mail(raw: bytes, *, max_text: int = MAX_TEXT) -> ParsedMail:
    """Headers, text (text/plain, else text from text/html) and attachments of a mail."""
    message = BytesParser(policy=_POLICY).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    headers: dict[str, Any] = {}
    for name, value in message.items():
        key, text = name.lower(), str(value)
        if key not in headers:
            headers[key] = text
        elif isinstance(headers[key], list):
            headers[key].append(text)
        else:
            headers[key] = [headers[key], text]
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",)) if plain is None else None
    text = ""
    if plain is not None:
        text = _content(plain)
    elif html is not None:
        text = html_to_text(_content(html))
    attachments = []
    for part in _leaves(message):
        if part is plain or part is html:
            continue
        filename = part.get_filename()
        disposition = part.get_content_disposition()
        if disposition != "attachment" and not filename and part.get_content_maintype() == "text":
            continue  # another text alternative, not an attachment
        body = _payload(part)
        meta = {
            "filename": filename,
            "content_type": part.get_content_type(),
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        attachments.append((meta, body))
    message_id = str(message.get("message-id") or "").strip() or None

    def header(name: str) -> str | None:
        value = message.get(name)
        return None if value is None else str(value)

    data: dict[str, Any] = {
        "message_id": message_id,
        "from": header("from"),
        "to": header("to"),
        "cc": header("cc"),
        "subject": header("subject"),
        "date": header("date"),
        "headers": headers,
        "text": text[:max_text],
        "text_from_html": plain is None and html is not None,
        "text_truncated": len(text) > max_text,
        "size": len(raw),
    }
    return ParsedMail(data, attachments, message_id)


_MAX_DEPTH = 32  # nested multiparts deeper than this are not searched for attachments


def _leaves(part: EmailMessage, depth: int = 0) -> Iterator[EmailMessage]:
    """The non-multipart parts, where a message/rfc822 part (a forwarded mail) is one leaf.

    `walk()` would descend into a forwarded mail: its text was dropped and its own
    attachments were reported as the outer mail's, while the forwarded mail was lost.
    """
    if part.get_content_type() == "message/rfc822" and depth > 0:
        yield part
    elif part.is_multipart():
        if depth < _MAX_DEPTH:
            for child in part.iter_parts():
                yield from _leaves(child, depth + 1)  # type: ignore[arg-type]
    else:
        yield part


def _payload(part: EmailMessage) -> bytes:
    """The decoded bytes of a leaf; a forwarded mail as its own bytes (CRLF line ends)."""
    if part.get_content_type() == "message/rfc822" and part.is_multipart():
        inner: Any = part.get_payload(0)
        try:
            return bytes(inner.as_bytes(policy=_POLICY.clone(linesep="\r\n")))
        except Exception:  # a forwarded mail the generator cannot write back
            return str(inner).encode("utf-8", "surrogateescape")
    content = part.get_payload(decode=True)
    return content if isinstance(content, bytes) else b""


def _content(part: Any) -> str:
    """A text part decoded per its charset (an unknown charset: UTF-8, replacing errors)."""
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError):
        payload = part.get_payload(decode=True) or b""
        return bytes(payload).decode("utf-8", errors="replace")


class _TextOf(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})
    _HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The readable text of an HTML body: tags dropped, blocks on their own lines."""
    parser = _TextOf()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)
