"""A scripted model for tests and examples: no network, predictable answers, countable calls."""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import orjson

from tidings.errors import ConfigError
from tidings.llm.base import Completion, Model, Price, Request

Script = Callable[[Request], "str | Completion | Awaitable[str | Completion]"]


class FakeModel(Model):
    """Answers from a script: a list of replies, or a function of the request.

    Listed replies are used in turn and the last one repeats. With `record_to`, each call
    appends one JSON line (model, messages) to that file, so a test can count calls made
    by any process, including one it killed.
    """

    provider = "fake"

    def __init__(
        self,
        replies: Sequence[str | Completion] | Script = ("ok",),
        *,
        name: str = "fake",
        price: Price | None = None,
        record_to: str | Path | None = None,
    ) -> None:
        if not callable(replies) and not replies:
            raise ConfigError("FakeModel needs at least one reply")
        self.name = name
        self.price = price
        self.record_to = Path(record_to) if record_to is not None else None
        self._script = replies
        self.requests: list[Request] = []

    async def complete(self, request: Request) -> Completion:
        """The next scripted answer, with word counts standing in for tokens."""
        n = len(self.requests)
        self.requests.append(request)
        if self.record_to is not None:
            line = orjson.dumps({"model": self.name, "pid": os.getpid(), "n": n,
                                 "messages": request.messages})  # fmt: skip
            with self.record_to.open("ab") as f:  # one small append: atomic enough per line
                f.write(line + b"\n")
        if callable(self._script):
            answer = self._script(request)
            if inspect.isawaitable(answer):
                answer = await answer
        else:
            answer = self._script[min(n, len(self._script) - 1)]
        if isinstance(answer, Completion):
            return answer
        tokens_in = sum(len(str(m.get("content", "")).split()) for m in request.messages)
        tokens_out = len(answer.split())
        return Completion(
            text=answer, model=self.name, tokens_in=tokens_in, tokens_out=tokens_out,
            cost=self.cost(tokens_in, tokens_out), finish_reason="stop",
        )  # fmt: skip
