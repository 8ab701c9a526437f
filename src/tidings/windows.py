"""Windowed aggregates per key, on event time: the pure part (no I/O).

A window is declared on an agent (``windows={"visits_1h": Count("1h", on="page.viewed")}``)
and kept per key by the runtime (`tidings.runtime.enrich`). This module only says what a
window's state is, how an event changes it, what it reads at a time, and when it closes:

    accept(window, state, t_ms, value, event_id) -> (state, Verdict)
    read(window, state, at_ms) -> value
    closing(window, state, now_ms) -> (state, [Closed])

State is plain JSON (dicts, lists, numbers) so it is stored as it is, in the same
transaction as the inbox marker of the event that changed it.

**Time.** Events are placed by their CloudEvents ``time``. A window is cut into buckets
of `bucket` (tumbling: one bucket, the window itself, aligned to the epoch). The
*watermark* of a key is the latest event time seen for it.

**Sliding windows** read, at time T, the `size / bucket` buckets ending with T's bucket:
every event in ``[floor(T/b)*b + b - size, floor(T/b)*b + b)``. So the history covered is
between ``size - bucket`` and ``size`` back from T (the documented bucket error: at most
one bucket's events at the old edge are counted that a strict ``(T - size, T]`` would
leave out; default bucket ``size / 60``).

**Late events.** An event older than the watermark is placed in its own bucket as long
as that bucket is still kept: for a sliding window, no older than ``watermark - size -
grace``; for a tumbling one, its window not yet closed (end + grace after the
watermark). Later still, `late` decides: ``"drop"`` (default, counted as dropped by
windows) or ``"current"`` (counted in the watermark's bucket instead).

**Distinct** is exact while the buckets it reads hold at most `exact_up_to` values;
above that it is a HyperLogLog of 1,024 registers per bucket, whose standard error is
1.04 / sqrt(1024) = 3.25 % (within 10 % at three standard errors).

**Collect** keeps the last `last` values by event time (ties by event id).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Literal

from tidings.errors import ConfigError

Kind = Literal["count", "sum", "min", "max", "distinct", "collect"]
Late = Literal["drop", "current"]
Verdict = Literal["added", "late", "moved"]  # moved: too late, counted in the current bucket

HLL_BITS = 10  # 2**10 registers: standard error 1.04 / 32 = 3.25 %
HLL_REGISTERS = 1 << HLL_BITS
DEFAULT_BUCKETS = 60  # buckets per sliding window, unless `bucket=` says otherwise

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text: str | float | int, what: str = "duration") -> int:
    """``"10m"`` as milliseconds (also ``ms``, ``s``, ``h``, ``d``; a number is seconds)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return round(float(text) * 1000)
    match = _DURATION.match(str(text))
    if match is None:
        raise ConfigError(
            f"{what} {text!r} is not a duration: write it as '500ms', '30s', '10m', '1h' or '1d'"
        )
    return round(float(match.group(1)) * _UNIT_MS[match.group(2)])


@dataclass(frozen=True, slots=True)
class Window:
    """One windowed aggregate, as declared (build it with `Count`, `Sum`, ...)."""

    kind: Kind
    size_ms: int
    bucket_ms: int
    tumbling: bool = False
    on: tuple[str, ...] | None = None  # event types that feed it; None: the agent's on=
    where: str | Callable[..., bool] | None = None  # its own filter (CEL on data/event)
    key: str | Callable[..., Any] | None = None  # None: the agent's key
    field: str | None = None  # dotted path of the value (data.amount); None: the data
    grace_ms: int = 0
    late: Late = "drop"
    exact_up_to: int = 1000  # Distinct: exact up to this many values
    last: int = 10  # Collect: how many
    on_close: str | None = None  # tumbling: event type emitted when a window closes
    predicate: Callable[..., bool] | None = _field(default=None, compare=False)

    @property
    def buckets(self) -> int:
        """How many buckets one read covers."""
        return self.size_ms // self.bucket_ms


def _window(
    kind: Kind, size: str | float, *, on: str | Sequence[str] | None, where: Any, key: Any,
    field: str | None, tumbling: bool, bucket: str | float | None, grace: str | float,
    late: Late, on_close: str | None, exact_up_to: int = 1000, last: int = 10,
) -> Window:  # fmt: skip
    size_ms = duration_ms(size, f"{kind} window size")
    if size_ms <= 0:
        raise ConfigError(f"{kind} window size {size!r} must be longer than 0")
    if tumbling:
        bucket_ms = size_ms
    elif bucket is None:
        bucket_ms = max(size_ms // DEFAULT_BUCKETS, 1)
        while size_ms % bucket_ms:  # a whole number of buckets
            bucket_ms -= 1
    else:
        bucket_ms = duration_ms(bucket, f"{kind} window bucket")
        if bucket_ms <= 0 or size_ms % bucket_ms:
            raise ConfigError(
                f"{kind} window of {size!r}: bucket={bucket!r} must divide the size evenly"
            )
    if duration_ms(grace, "grace") < 0:
        raise ConfigError(f"{kind} window of {size!r}: grace={grace!r} must be 0 or longer")
    if late not in ("drop", "current"):
        raise ConfigError(f"{kind} window: late={late!r}; use 'drop' or 'current'")
    if on_close is not None and not tumbling:
        raise ConfigError(
            f"{kind} window of {size!r}: on_close= needs tumbling=True (a sliding window"
            " never ends)"
        )
    if kind in ("sum", "min", "max", "distinct") and field is None:
        raise ConfigError(f"{kind.capitalize()}({size!r}) needs field=, e.g. field='data.amount'")
    patterns = (on,) if isinstance(on, str) else (tuple(on) if on is not None else None)
    return Window(
        kind, size_ms, bucket_ms, tumbling, patterns, where, key, field,
        duration_ms(grace, "grace"), late, max(exact_up_to, 0), max(last, 1), on_close,
    )  # fmt: skip


def Count(
    size: str | float, *, on: str | Sequence[str] | None = None, where: Any = None,
    key: Any = None, tumbling: bool = False, bucket: str | float | None = None,
    grace: str | float = 0, late: Late = "drop", on_close: str | None = None,
) -> Window:  # fmt: skip
    """How many events in the window."""
    return _window("count", size, on=on, where=where, key=key, field=None, tumbling=tumbling,
                   bucket=bucket, grace=grace, late=late, on_close=on_close)  # fmt: skip


def Sum(
    size: str | float, *, field: str, on: str | Sequence[str] | None = None,
    where: Any = None, key: Any = None, tumbling: bool = False,
    bucket: str | float | None = None, grace: str | float = 0, late: Late = "drop",
    on_close: str | None = None,
) -> Window:  # fmt: skip
    """The sum of `field` over the window (non-numbers are skipped)."""
    return _window("sum", size, on=on, where=where, key=key, field=field, tumbling=tumbling,
                   bucket=bucket, grace=grace, late=late, on_close=on_close)  # fmt: skip


def Min(
    size: str | float, *, field: str, on: str | Sequence[str] | None = None,
    where: Any = None, key: Any = None, tumbling: bool = False,
    bucket: str | float | None = None, grace: str | float = 0, late: Late = "drop",
    on_close: str | None = None,
) -> Window:  # fmt: skip
    """The smallest `field` in the window (None when empty)."""
    return _window("min", size, on=on, where=where, key=key, field=field, tumbling=tumbling,
                   bucket=bucket, grace=grace, late=late, on_close=on_close)  # fmt: skip


def Max(
    size: str | float, *, field: str, on: str | Sequence[str] | None = None,
    where: Any = None, key: Any = None, tumbling: bool = False,
    bucket: str | float | None = None, grace: str | float = 0, late: Late = "drop",
    on_close: str | None = None,
) -> Window:  # fmt: skip
    """The largest `field` in the window (None when empty)."""
    return _window("max", size, on=on, where=where, key=key, field=field, tumbling=tumbling,
                   bucket=bucket, grace=grace, late=late, on_close=on_close)  # fmt: skip


def Distinct(
    size: str | float, *, field: str, on: str | Sequence[str] | None = None,
    where: Any = None, key: Any = None, tumbling: bool = False,
    bucket: str | float | None = None, grace: str | float = 0, late: Late = "drop",
    on_close: str | None = None, exact_up_to: int = 1000,
) -> Window:  # fmt: skip
    """How many distinct values of `field`: exact up to `exact_up_to`, then within 3.25 %."""
    return _window("distinct", size, on=on, where=where, key=key, field=field,
                   tumbling=tumbling, bucket=bucket, grace=grace, late=late,
                   on_close=on_close, exact_up_to=exact_up_to)  # fmt: skip


def Collect(
    size: str | float, *, last: int = 10, field: str | None = None,
    on: str | Sequence[str] | None = None, where: Any = None, key: Any = None,
    tumbling: bool = False, bucket: str | float | None = None, grace: str | float = 0,
    late: Late = "drop", on_close: str | None = None,
) -> Window:  # fmt: skip
    """The last `last` values of `field` (or whole data) in the window, oldest first."""
    return _window("collect", size, on=on, where=where, key=key, field=field,
                   tumbling=tumbling, bucket=bucket, grace=grace, late=late,
                   on_close=on_close, last=last)  # fmt: skip


class _Drop:
    """What an enricher returns to drop its event before the filter (counted)."""

    _instance: _Drop | None = None

    def __new__(cls) -> _Drop:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()  # ``return DROP`` from an enricher (tidings.runtime.enrich)


# -- state ------------------------------------------------------------------------------
# {"wm": watermark ms or None, "b": {str(bucket start ms): aggregate}}


def empty() -> dict[str, Any]:
    """The state of a window that has seen nothing."""
    return {"wm": None, "b": {}}


def bucket_of(window: Window, t_ms: int) -> int:
    """The start of the bucket that holds time `t_ms`."""
    return (t_ms // window.bucket_ms) * window.bucket_ms


def _kept_from(window: Window, watermark: int) -> int:
    """The oldest bucket start still kept, given the watermark."""
    if window.tumbling:
        # A window is kept until its end + grace is behind the watermark.
        return bucket_of(window, watermark - window.grace_ms) - window.size_ms + window.bucket_ms
    return bucket_of(window, watermark - window.size_ms - window.grace_ms)


def accept(
    window: Window, state: dict[str, Any], t_ms: int, value: Any, event_id: str
) -> tuple[dict[str, Any], Verdict]:
    """`state` with one event at `t_ms` added (a new dict), and what became of it."""
    buckets: dict[str, Any] = dict(state.get("b") or {})
    watermark = state.get("wm")
    verdict: Verdict = "added"
    start = bucket_of(window, t_ms)
    closed_to = state.get("ct")  # a tumbling window closed on time stays closed
    if (watermark is not None and start < _kept_from(window, watermark)) or (
        closed_to is not None and start < closed_to
    ):
        if window.late == "drop":
            return state, "late"
        start, verdict = bucket_of(window, max(watermark or t_ms, closed_to or 0)), "moved"
    new_wm = t_ms if watermark is None else max(watermark, t_ms)
    slot = str(start)
    new_bucket = slot not in buckets
    buckets[slot] = _add(window, buckets.get(slot), value, t_ms, event_id)
    # Forget buckets no read can reach any more (only a new bucket can push one out). A
    # tumbling window's closed buckets go in `closing` (with the close they report).
    if new_bucket and not window.tumbling:
        oldest = _kept_from(window, new_wm)
        buckets = {s: a for s, a in buckets.items() if int(s) >= oldest}
    return {"wm": new_wm, "b": buckets, **_rest(state)}, verdict


def _rest(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("wm", "b")}


def read(window: Window, state: dict[str, Any], at_ms: int) -> Any:
    """The window's value at time `at_ms` (for a tumbling one: the window holding it)."""
    last = bucket_of(window, at_ms)
    first = last - (window.buckets - 1) * window.bucket_ms
    parts = [a for s, a in (state.get("b") or {}).items() if first <= int(s) <= last]
    return _merge(window, parts)


def closing(
    window: Window, state: dict[str, Any], now_ms: int
) -> tuple[dict[str, Any], list[Closed]]:
    """Tumbling: the windows whose end + grace is at or before `now_ms`, taken out of `state`.

    `now_ms` is the later of the watermark and the wall clock when a timer fired, so a
    window closes on time even when no further event comes for its key.
    """
    if not window.tumbling:
        return state, []
    buckets: dict[str, Any] = dict(state.get("b") or {})
    closed: list[Closed] = []
    for slot in sorted(buckets, key=int):
        start = int(slot)
        if start + window.size_ms + window.grace_ms <= now_ms:
            closed.append(Closed(start, start + window.size_ms, _merge(window, [buckets[slot]])))
            del buckets[slot]
    if not closed:
        return state, []
    rest = _rest(state)
    rest["ct"] = max(rest.get("ct") or 0, closed[-1].end_ms)
    return {"wm": state.get("wm"), "b": buckets, **rest}, closed


def next_close(window: Window, state: dict[str, Any]) -> int | None:
    """When (ms) the next open tumbling window of `state` is due to close, if any."""
    if not window.tumbling or not state.get("b"):
        return None
    return min(int(s) for s in state["b"]) + window.size_ms + window.grace_ms


@dataclass(frozen=True, slots=True)
class Closed:
    """A tumbling window that closed: its span and final value."""

    start_ms: int
    end_ms: int
    value: Any


# -- aggregates ---------------------------------------------------------------------------


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _add(window: Window, agg: Any, value: Any, t_ms: int, event_id: str) -> Any:
    kind = window.kind
    if kind == "count":
        return int(agg or 0) + 1
    if kind == "sum":
        n = _number(value)
        return (agg or 0) + (n or 0)
    if kind in ("min", "max"):
        n = _number(value)
        if n is None:
            return agg
        if agg is None:
            return n
        return min(agg, n) if kind == "min" else max(agg, n)
    if kind == "collect":
        items = [*(agg or []), [t_ms, event_id, value]]
        items.sort(key=lambda item: (item[0], item[1]))
        return items[-window.last :]
    # distinct: {"v": [values]} exact, or {"h": hex registers}
    current = agg or {"v": []}
    if "h" in current:
        registers = bytearray.fromhex(current["h"])
        _hll_add(registers, value)
        return {"h": registers.hex()}
    values = current["v"]
    if value in values:
        return current
    values = [*values, value]
    if len(values) > window.exact_up_to:
        registers = bytearray(HLL_REGISTERS)
        for v in values:
            _hll_add(registers, v)
        return {"h": registers.hex()}
    return {"v": values}


def _merge(window: Window, parts: list[Any]) -> Any:
    kind = window.kind
    if kind == "count":
        return sum(int(p) for p in parts)
    if kind == "sum":
        return sum(parts) if parts else 0
    if kind in ("min", "max"):
        found = [p for p in parts if p is not None]
        if not found:
            return None
        return min(found) if kind == "min" else max(found)
    if kind == "collect":
        items = sorted((item for p in parts for item in p), key=lambda i: (i[0], i[1]))
        return [item[2] for item in items[-window.last :]]
    exact: list[Any] = []
    sketches: list[bytearray] = []
    for p in parts:
        if "h" in p:
            sketches.append(bytearray.fromhex(p["h"]))
        else:
            exact.extend(p["v"])
    if not sketches:
        # Hashable values in a set (1, 1.0 and True are one, as with ==); others (lists,
        # dicts) by their canonical JSON. Stop past exact_up_to: the sketch counts then.
        # (Comparing each value with every one seen was quadratic: 60 buckets of 900
        # values took 90 s to read, on every event of the key.)
        seen: set[Any] = set()
        for v in exact:
            try:
                seen.add(v)
            except TypeError:
                seen.add(("tidings.json", json.dumps(v, sort_keys=True, default=str)))
            if len(seen) > window.exact_up_to:
                break
        else:
            return len(seen)
    registers = bytearray(HLL_REGISTERS)
    for v in exact:
        _hll_add(registers, v)
    for sketch in sketches:
        for n, r in enumerate(sketch):
            if r > registers[n]:
                registers[n] = r
    return _hll_estimate(registers)


def _hash64(value: Any) -> int:
    text = repr(value).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _hll_add(registers: bytearray, value: Any) -> None:
    h = _hash64(value)
    index = h >> (64 - HLL_BITS)
    rest = (h << HLL_BITS) & ((1 << 64) - 1)
    rank = 1
    while rank <= 64 - HLL_BITS and not rest & (1 << 63):
        rank += 1
        rest <<= 1
    if rank > registers[index]:
        registers[index] = rank


def _hll_estimate(registers: bytearray) -> int:
    m = len(registers)
    alpha = 0.7213 / (1 + 1.079 / m)
    raw = alpha * m * m / sum(2.0**-r for r in registers)
    zeros = registers.count(0)
    if raw <= 2.5 * m and zeros:
        raw = m * math.log(m / zeros)  # linear counting for small cardinalities
    return round(raw)
