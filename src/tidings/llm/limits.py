"""Rate limits per model: requests and tokens per window, and calls at once.

A call that would break a limit waits for room instead of failing: the event is held
back while its worker keeps the delivery alive (the ack deadline is extended for running
handlers). Only a wait longer than `max_wait` gives up with `RateLimited`, which the
runtime turns into a delayed retry of the event, not a failure of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tidings.errors import ConfigError, RateLimited


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one model; None = unlimited. `window` is in seconds (a minute by default)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrency: int | None = None
    max_wait: float = 120.0
    window: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"Limits({name}={value}): use a positive number or None")


class Limiter:
    """Enforces one model's `Limits` inside one process."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._calls: deque[tuple[float, int]] = deque()  # (start time, tokens) in the window
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(limits.concurrency) if limits.concurrency else None
        self.waited = 0.0  # seconds callers spent held back (for metrics and tests)

    def _room_after(self, tokens: int, at: float) -> float:
        """Seconds until a call of `tokens` fits in the window (0 = now)."""
        limits, calls = self.limits, self._calls
        while calls and calls[0][0] <= at - limits.window:
            calls.popleft()
        wait = 0.0
        if limits.requests_per_minute is not None and len(calls) >= limits.requests_per_minute:
            oldest = calls[len(calls) - limits.requests_per_minute][0]
            wait = max(wait, oldest + limits.window - at)
        if limits.tokens_per_minute is not None:
            tokens = min(tokens, limits.tokens_per_minute)  # a huge call still gets through
            used = sum(t for _, t in calls)
            if used + tokens > limits.tokens_per_minute:
                freed = 0
                for start, spent in calls:
                    freed += spent
                    if used - freed + tokens <= limits.tokens_per_minute:
                        wait = max(wait, start + limits.window - at)
                        break
        return wait

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[list[int]]:
        """Wait for room for a call estimated at `tokens`; yield a cell for the real count."""
        started = time.monotonic()
        async with self._lock:  # callers take turns, so waits are first come, first served
            while True:
                now = time.monotonic()
                wait = self._room_after(tokens, now)
                if wait <= 0:
                    break
                if now - started + wait > self.limits.max_wait:
                    raise RateLimited(
                        f"rate limit of the model held this call back for over"
                        f" {self.limits.max_wait:.0f}s",
                        retry_after=wait,
                    )
                await asyncio.sleep(wait)
            entry = [time.monotonic(), tokens]
            self._calls.append((entry[0], tokens))
        if self._slots is not None:
            await self._slots.acquire()
        self.waited += time.monotonic() - started
        actual = [tokens]
        try:
            yield actual
        finally:
            if self._slots is not None:
                self._slots.release()
            # Correct the estimate with the real count, so later calls see true usage.
            for n, (start, spent) in enumerate(self._calls):
                if start == entry[0] and spent == tokens:
                    self._calls[n] = (start, actual[0])
                    break


def estimate_tokens(text_length: int, max_tokens: int | None) -> int:
    """A rough count before the call (about 4 characters a token, plus the answer budget)."""
    return text_length // 4 + 1 + (max_tokens or 256)
