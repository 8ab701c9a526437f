"""Which OTEL_* variables turn tracing on for `tidings run`, and what a wrong one says.

Each case runs in a fresh interpreter: a process has one global tracer provider, and
`configure_from_env` installs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
from tidings.errors import ConfigError
from tidings.observability import tracing
try:
    print("on" if tracing.configure_from_env(service_name="app") else "off", tracing.active())
except ConfigError as e:
    print("error:", e)
"""


def outcome(**variables: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(variables)
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, "off False"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
         "off False"),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, "off False"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "on True"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, "on True"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "on True"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "error: unknown span exporter 'zipkin': use otlp,"
         " console or none (OTEL_TRACES_EXPORTER)"),
    ],
)  # fmt: skip
def test_the_standard_variables_decide(variables: dict[str, str], expected: str) -> None:
    assert outcome(**variables) == expected


def test_grpc_without_its_exporter_names_the_package() -> None:
    said = outcome(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert said.startswith("error:") and "opentelemetry-exporter-otlp-proto-grpc" in said


def test_a_value_the_sdk_refuses_is_one_line_naming_the_variables() -> None:
    said = outcome(OTEL_TRACES_EXPORTER="console", OTEL_BSP_MAX_QUEUE_SIZE="-5")
    assert said == (
        "error: the OpenTelemetry SDK refused its settings (max_queue_size must be a positive"
        " integer.): fix or unset the OTEL_* variable that sets it (set here:"
        " OTEL_BSP_MAX_QUEUE_SIZE, OTEL_TRACES_EXPORTER)"
    )


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-" + "a" * 10_000,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\x01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        '00-\n\n"}{aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
    ],
)
def test_a_traceparent_that_is_not_w3c_names_no_trace(traceparent: str) -> None:
    """Log lines name the trace an event carries: junk is no trace, never echoed."""
    from tidings.observability import tracing

    assert tracing.trace_id_of(traceparent) is None
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.trace_id_of(good) == "0af7651916cd43dd8448eb211c80319c"


def test_stopping_with_the_collector_away_drops_the_last_spans_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tidings run` flushes the spans still batched when it stops: with a collector
    that does not answer, the SDK waited 30 s (past most stop grace periods)."""
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from tidings.observability import tracing

    released = threading.Event()

    class Away(SpanExporter):
        """A collector that never answers (until the test ends)."""

        def export(self, spans: object) -> SpanExportResult:
            released.wait(60)
            return SpanExportResult.FAILURE

    monkeypatch.setattr(tracing, "SHUTDOWN_TIMEOUT", 0.5)
    provider = tracing.configure(Away())
    try:
        provider.get_tracer("test").start_span("last").end()
        stopping = threading.Thread(target=tracing.shutdown, daemon=True)
        stopping.start()
        stopping.join(10)  # well short of the SDK's own 30 s
        assert not stopping.is_alive()
        assert not tracing.active()
    finally:
        released.set()
        tracing.disable()
