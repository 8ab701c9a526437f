"""What the HTTP adapters share: the client, error classification and tool-name mapping."""

from __future__ import annotations

from typing import Any

from tidings.errors import (
    ConfigError,
    LLMError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from tidings.llm.base import Price

try:
    import httpx
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        'the OpenAI and Anthropic adapters need httpx: pip install "tidings[llm]"'
    ) from e

# List prices in USD per million tokens (input, output) when this was written; pass
# price= to an adapter for your contract's prices or a model not listed here.
PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "claude-3-5-haiku-latest": Price(0.80, 4.00),
    "claude-sonnet-4-20250514": Price(3.00, 15.00),
    "claude-opus-4-20250514": Price(15.00, 75.00),
}

RETRYABLE_STATUS = frozenset({408, 409, 425, 500, 502, 503, 504, 529})


def client(base_url: str, headers: dict[str, str], timeout: float) -> httpx.AsyncClient:
    """One pooled client per model object."""
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any], provider: str) -> Any:
    """POST JSON and return the parsed answer, or raise a classified `LLMError`."""
    try:
        response = await http.post(path, json=body)
    except httpx.TimeoutException as e:
        raise ProviderUnavailable(f"{provider} did not answer in time: {e!r}") from e
    except httpx.TransportError as e:
        raise ProviderUnavailable(f"{provider} cannot be reached: {e!r}") from e
    if response.status_code >= 400:
        raise classify(response, provider)
    try:
        return response.json()
    except ValueError as e:
        raise ProviderUnavailable(f"{provider} answered with something that is not JSON") from e


def classify(response: httpx.Response, provider: str) -> LLMError:
    """Map an error response to retryable (`RateLimited`, `ProviderUnavailable`) or not."""
    status = response.status_code
    try:
        payload = response.json()
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        detail = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        detail = response.text[:500]
    message = f"{provider} answered {status}: {detail}"
    if status == 429:
        return RateLimited(message, retry_after=retry_after(response), status=status)
    if status in RETRYABLE_STATUS or status >= 500:
        return ProviderUnavailable(message, status=status)
    return ProviderRejected(message, status=status)


def retry_after(response: httpx.Response) -> float:
    """Seconds the provider asked us to wait (Retry-After), 1 s if it did not say."""
    for name in ("retry-after", "x-ratelimit-reset-requests"):
        value = response.headers.get(name)
        if value:
            try:
                return max(float(value.rstrip("s")), 0.0)
            except ValueError:
                continue
    return 1.0


def wire_name(name: str) -> str:
    """Providers allow [A-Za-z0-9_-] in tool names; Tidings tool names have dots."""
    return name.replace(".", "__")


def price_for(model: str, price: Price | None) -> Price | None:
    """The given price, else the list price of a known model, else None (cost 0)."""
    return price if price is not None else PRICES.get(model)
