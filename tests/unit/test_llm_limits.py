"""Per-model limits hold calls back (requests, tokens, concurrency) and give up clearly."""

from __future__ import annotations

import asyncio

import pytest

from tidings.errors import ConfigError, RateLimited
from tidings.llm import Completion, FakeModel, Limits, Models, Request
from tidings.llm.limits import Limiter


def test_token_budget_holds_the_next_call_until_the_window_frees() -> None:
    limiter = Limiter(Limits(tokens_per_minute=100, window=60))
    assert limiter._room_after(60, at=1000.0) == 0  # the first call fits
    limiter._calls.append((1000.0, 60))
    # 60 more would make 120 > 100 in one window: wait until the first call leaves it.
    assert limiter._room_after(60, at=1010.0) == pytest.approx(50.0)
    assert limiter._room_after(40, at=1010.0) == 0  # a smaller call still fits
    assert limiter._room_after(60, at=1060.0) == 0


def test_requests_per_window_count_calls() -> None:
    limiter = Limiter(Limits(requests_per_minute=2, window=10))
    limiter._calls.extend([(100.0, 1), (104.0, 1)])
    assert limiter._room_after(1, at=105.0) == pytest.approx(5.0)
    assert limiter._room_after(1, at=110.5) == 0


async def test_real_token_counts_replace_the_estimate() -> None:
    limiter = Limiter(Limits(tokens_per_minute=100, window=60))
    async with limiter.slot(90) as actual:
        actual[0] = 10  # the call used far fewer tokens than estimated
    assert [tokens for _, tokens in limiter._calls] == [10]
    async with limiter.slot(80):  # fits in what is really left: no wait of a minute
        pass


async def test_concurrency_limit_runs_calls_one_at_a_time() -> None:
    limiter = Limiter(Limits(concurrency=1))
    running: list[int] = []
    overlap: list[int] = []

    async def call(n: int) -> None:
        async with limiter.slot(1):
            running.append(n)
            overlap.append(len(running))
            await asyncio.sleep(0.01)
            running.remove(n)

    await asyncio.gather(*(call(n) for n in range(5)))
    assert max(overlap) == 1


async def test_a_wait_beyond_max_wait_raises_rate_limited() -> None:
    limiter = Limiter(Limits(requests_per_minute=1, window=60, max_wait=0.5))
    async with limiter.slot(1):
        pass
    with pytest.raises(RateLimited) as limited:
        async with limiter.slot(1):
            pass
    assert limited.value.retry_after > 50


async def test_models_registry_resolves_defaults_and_names() -> None:
    models = Models()
    with pytest.raises(ConfigError, match="no model is registered"):
        models.resolve(None)
    models.add(FakeModel(["a"], name="first"))
    models.add(FakeModel([Completion("b", "second", 3, 4, 0.5)], name="second"))
    with pytest.raises(ConfigError, match="registered twice"):
        models.add(FakeModel(["c"], name="first"))
    with pytest.raises(ConfigError, match="'third' is not registered"):
        models.resolve("third")
    assert (await models.complete(None, Request([{"role": "user", "content": "x"}]))).text == "a"
    second = await models.complete("second", Request([]))
    assert (second.text, second.tokens_out, second.cost) == ("b", 4, 0.5)
    with pytest.raises(ConfigError, match="positive"):
        Limits(concurrency=0)
