"""Prometheus metrics: /metrics on the gateway, `tidings run --metrics-port`, one view of N.

Every exposition is read with prometheus-client's own parser, and every count is checked
against what the test made happen on a real nats-server and a real SQLite store.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.gateway.conftest import JWT_SECRET, auth, gateway_config, start_gateway
from tests.helpers import eventually, running, settings_for
from tidings import App, Backoff, Context, Event
from tidings.client import Client
from tidings.errors import ToolFailed
from tidings.llm import FakeModel, Price
from tidings.observability.metrics import merge, serve_merged

FAST = Backoff(initial=0.05, maximum=0.2)
ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counted_app() -> App:
    """10 events: n < 3 are filtered, n == 8 fails once, n == 9 is dead-lettered (2 tries)."""
    app = App("metered")
    app.llm.add(FakeModel(["fine thanks"], price=Price(input=1.0, output=2.0)))

    @app.tool("lookup")
    async def lookup(n: int) -> int:
        if n == 3:
            raise ValueError("no such n")
        return n * 2

    @app.agent(
        "counted", on="metered.tick", where="data.n >= 3", key="data.key", max_attempts=2,
        backoff=FAST,
    )  # fmt: skip
    async def counted(event: Event, ctx: Context) -> Any:
        n = event.data["n"]
        if n == 9:
            raise RuntimeError("nine is poison")
        if n == 8 and ctx.attempt == 1:
            raise ConnectionError("flaky once")
        try:
            doubled = await ctx.tool("lookup", {"n": n})
        except ToolFailed:
            doubled = None
        answer = await ctx.llm.complete([{"role": "user", "content": "how are you"}])
        return {"doubled": doubled, "answer": answer.text}

    return app


@pytest.mark.nats
async def test_gateway_metrics_count_what_happened(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = counted_app()
    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    try:
        async with Client(worker.settings) as client:
            for n in range(10):
                await client.publish("metered.tick", {"n": n, "key": f"k{n}"})
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            assert (await http.get("/metrics")).status_code == 401
            lacking = await http.get("/metrics", headers=auth("alice"))
            assert lacking.status_code == 403, lacking.text
            assert "metrics" in lacking.json()["error"]
            scraper = auth("prometheus", scopes="metrics")
            samples: Samples = {}

            async def settled() -> bool:
                r = await http.get("/metrics", headers=scraper)
                assert r.status_code == 200, r.text
                assert r.headers["content-type"].startswith("text/plain")
                samples.update(parse(r.text))
                return (
                    value(samples, "tidings_events_handled_total", agent="counted") == 6
                    and value(samples, "tidings_events_dead_lettered_total", agent="counted") == 1
                    and value(samples, "tidings_consumer_pending", consumer="counted") == 0
                    and value(samples, "tidings_dlq_depth", agent="counted") == 1
                )

            await eventually(settled, timeout=30, message="all ten events settled")
            await http.get("/no/such/path/abc123")
            r = await http.get("/metrics", headers=scraper)
            samples = parse(r.text)
    finally:
        await server.stop()
        await worker.stop(grace=5)

    agent = {"agent": "counted"}
    assert value(samples, "tidings_events_received_total", **agent) == 12  # n=8, n=9 twice
    assert value(samples, "tidings_events_filtered_total", **agent) == 3
    assert value(samples, "tidings_filter_errors_total", **agent) == 0
    assert value(samples, "tidings_events_retried_total", **agent) == 2
    assert value(samples, "tidings_events_duplicate_total", **agent) == 0
    assert value(samples, "tidings_handler_seconds_count", **agent) == 6
    assert value(samples, "tidings_handler_seconds_bucket", le="+Inf", **agent) == 6
    assert value(samples, "tidings_events_in_flight", **agent) == 0
    assert value(samples, "tidings_consumer_lag", consumer="counted") == 0

    tool = {"tool": "lookup"}
    assert value(samples, "tidings_tool_calls_total", **tool) == 6
    assert value(samples, "tidings_tool_failures_total", **tool) == 1
    assert value(samples, "tidings_tool_dead_lettered_total", **tool) == 1
    assert value(samples, "tidings_dlq_depth", agent="tool:lookup") == 1

    model = {"model": "fake"}
    assert value(samples, "tidings_llm_calls_total", **model) == 6
    assert value(samples, "tidings_llm_failures_total", **model) == 0
    assert value(samples, "tidings_llm_tokens_total", type="input", **model) == 6 * 3
    assert value(samples, "tidings_llm_tokens_total", type="output", **model) == 6 * 2
    assert value(samples, "tidings_llm_cost_usd_total", **model) == pytest.approx(
        6 * (3 * 1.0 + 2 * 2.0) / 1_000_000
    )

    requests = {
        labels: n
        for (name, labels), n in samples.items()
        if name == "tidings_gateway_requests_total"
    }
    assert requests[(("route", "/metrics"), ("status", "4xx"))] == 2
    assert requests[(("route", "/metrics"), ("status", "2xx"))] >= 1
    assert requests[(("route", "unmatched"), ("status", "4xx"))] == 1
    assert not any("abc123" in v for labels in requests for _, v in labels)  # no raw path
    assert value(samples, "tidings_gateway_stream_clients") == 0


@pytest.mark.nats
async def test_metrics_public_needs_no_credential(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    config = gateway_config(metrics_public=True)
    worker, server = await start_gateway(counted_app(), nats_url, namespace, tmp_path, config)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.get("/metrics")
    finally:
        await server.stop()
        await worker.stop(grace=5)
    assert r.status_code == 200
    assert value(parse(r.text), "tidings_events_received_total", agent="counted") == 0


@pytest.mark.nats
async def test_series_do_not_grow_with_keys_ids_or_paths(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("many")

    @app.agent("keyed", on="many.thing", where="data.n % 10 == 0", key="data.key")
    async def keyed(event: Event, ctx: Context) -> None:
        await ctx.state.set("seen", True)

    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    scraper = auth("prometheus", scopes="metrics")
    total = 0

    async def publish(client: Client, count: int) -> None:
        nonlocal total
        for start in range(total, total + count, 500):
            await asyncio.gather(
                *(
                    client.publish("many.thing", {"n": n, "key": f"key-{n}"})
                    for n in range(start, min(start + 500, total + count))
                )
            )
        total += count

    async def scrape(http: httpx.AsyncClient, handled: int) -> Samples:
        samples: Samples = {}

        async def done() -> bool:
            samples.clear()
            samples.update(parse((await http.get("/metrics", headers=scraper)).text))
            return value(samples, "tidings_events_handled_total", agent="keyed") == handled

        await eventually(done, timeout=90, interval=0.5, message=f"{handled} handled")
        return samples

    try:
        async with (
            Client(worker.settings) as client,
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        ):
            await publish(client, 10)
            await http.get("/metrics", headers=scraper)  # so its own series exists before
            await http.get("/no/such/path/0")
            await http.post("/v1/agents/nobody-0/invoke", json={"type": "x"}, headers=auth("a"))
            before = await scrape(http, 1)
            await publish(client, 10_000)
            for n in range(1, 50):
                await http.get(f"/no/such/path/{n}")
                await http.post(
                    f"/v1/agents/nobody-{n}/invoke", json={"type": "x"}, headers=auth(f"u{n}")
                )
            after = await scrape(http, 1001)
    finally:
        await server.stop()
        await worker.stop(grace=5)

    assert set(after) == set(before), set(after) ^ set(before)
    counts = {
        name: value(after, f"tidings_events_{name}_total", agent="keyed")
        for name in ("received", "filtered", "duplicate", "retried")
    }
    assert counts["received"] >= 10_010, counts  # redeliveries count too
    assert counts["filtered"] >= 9009, counts
    label_values = {v for _, labels in after for _, v in labels}
    assert not any(v.startswith(("key-", "nobody-", "/no/")) for v in label_values)


@pytest.mark.nats
async def test_worker_without_gateway_reports_no_gateway_series(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    async with running(counted_app(), settings_for(nats_url, namespace, tmp_path)) as worker:
        text = (await worker.metrics.render()).decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "tidings_events_handled" in names and "tidings_consumer_lag" in names
    assert not any(name.startswith("tidings_gateway") for name in names)


def test_merge_adds_counters_and_histograms_and_takes_bus_gauges_once() -> None:
    one = (
        "# TYPE tidings_events_handled_total counter\n"
        'tidings_events_handled_total{agent="a"} 4\n'
        "# TYPE tidings_handler_seconds histogram\n"
        'tidings_handler_seconds_bucket{agent="a",le="0.1"} 3\n'
        'tidings_handler_seconds_bucket{agent="a",le="+Inf"} 4\n'
        'tidings_handler_seconds_count{agent="a"} 4\n'
        'tidings_handler_seconds_sum{agent="a"} 0.5\n'
        "# TYPE tidings_consumer_lag gauge\n"
        'tidings_consumer_lag{consumer="a"} 7\n'
        "# TYPE tidings_events_in_flight gauge\n"
        'tidings_events_in_flight{agent="a"} 2\n'
    )
    two = one.replace("} 4\n", "} 6\n").replace("} 7\n", "} 9\n").replace("} 2\n", "} 1\n")
    merged = parse(merge([one, two]).decode())
    assert value(merged, "tidings_events_handled_total", agent="a") == 10
    assert value(merged, "tidings_handler_seconds_bucket", agent="a", le="0.1") == 6
    assert value(merged, "tidings_handler_seconds_bucket", agent="a", le="+Inf") == 10
    assert value(merged, "tidings_handler_seconds_sum", agent="a") == 1.0
    assert value(merged, "tidings_consumer_lag", consumer="a") == 9  # the same bus: once
    assert value(merged, "tidings_events_in_flight", agent="a") == 3  # per process: added


async def test_merged_view_on_port_0_names_the_port_it_bound(tmp_path: Path) -> None:
    """`--workers N --metrics-port 0` prints this URL: it must be the real, answering one."""
    url, stop = serve_merged("127.0.0.1", 0, tmp_path)
    try:
        assert not url.endswith(":0/metrics"), url
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.get(url)
        assert answer.status_code == 200
    finally:
        stop()


@pytest.mark.nats
@pytest.mark.slow
async def test_run_workers_metrics_port_gives_one_view(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    port, gateway_port = free_port(), free_port()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "TIDINGS_BUS": nats_url,
        "TIDINGS_NAMESPACE": namespace,
        "TIDINGS_HOME": str(home),
        "TIDINGS_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "TIDINGS_GATEWAY_JWT_SECRET": JWT_SECRET,
        "TIDINGS_GATEWAY_PORT": str(gateway_port),
        "TIDINGS_GATEWAY_METRICS_PUBLIC": "true",
    }
    command = [sys.executable, "-m", "tidings.cli", "run", "tests.gateway.run_app:app",
               "--quiet", "--workers", "2", "--metrics-port", str(port), "--gateway"]  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            announced: list[Path] = []

            async def both_up() -> bool:
                assert process.returncode is None, log.read_text()
                announced[:] = list(home.glob("metrics/*/*.url"))
                return len(announced) == 2

            await eventually(both_up, timeout=60, message="both workers announce their metrics")
            settings = settings_for(nats_url, namespace, tmp_path)
            async with Client(settings) as client:
                for n in range(40):
                    await client.publish("echo.request", n)
                    await client.publish("picky.request", {"ok": n % 4 == 0})
            samples: Samples = {}

            async def all_counted() -> bool:
                samples.clear()
                samples.update(parse((await http.get(url)).text))
                return (
                    value(samples, "tidings_events_handled_total", agent="echo") == 40
                    and value(samples, "tidings_events_handled_total", agent="picky") == 10
                )

            await eventually(all_counted, timeout=60, interval=0.3, message="one view of 2")
            each = [parse((await http.get(path.read_text())).text) for path in announced]
            # The gateway (served by worker 1) answers with the same one view.
            gateway = parse((await http.get(f"http://127.0.0.1:{gateway_port}/metrics")).text)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 0, log.read_text()

    for name, agent in [
        ("tidings_events_received_total", "echo"),
        ("tidings_events_handled_total", "echo"),
        ("tidings_events_filtered_total", "picky"),
        ("tidings_handler_seconds_count", "echo"),
    ]:
        parts = [value(s, name, agent=agent) for s in each]
        assert sum(parts) == value(samples, name, agent=agent), (name, parts)
        assert value(gateway, name, agent=agent) == value(samples, name, agent=agent), name
    assert value(samples, "tidings_events_filtered_total", agent="picky") == 30
    # Read from the bus: the same in both workers, reported once rather than doubled.
    lag = [value(s, "tidings_consumer_lag", consumer="echo") for s in each]
    assert value(samples, "tidings_consumer_lag", consumer="echo") == max(lag)
    assert not list(home.glob("metrics/*/*.url"))  # the workers withdrew, the folder is gone


def metrics_section() -> str:
    text = (ROOT / "docs" / "observability.md").read_text()
    start = text.index("## Metrics (Prometheus)")
    return text[start : text.index("\n## ", start + 1)]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.nats
async def test_docs_metrics_example_prints_what_the_page_shows(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    section = metrics_section()
    namespace_: dict[str, Any] = {"__name__": "docs_metrics"}
    exec(compile(blocks(section, "python")[0], "docs/observability.md", "exec"), namespace_)
    app = namespace_["app"]
    shell = blocks(section, "sh")[0]
    assert "tidings run shop:app --metrics-port 9464" in shell
    totals = [int(t) for t in re.findall(r'"total": (\d+)', shell)]
    shown = blocks(section, "text")[0].splitlines()
    lines: list[str] = []
    async with running(app, settings_for(nats_url, namespace, tmp_path)) as worker:
        async with Client(worker.settings) as client:
            for total in totals:
                await client.publish("order.placed", {"id": f"o-{total}", "total": total})

        async def as_shown() -> bool:
            text = (await worker.metrics.render()).decode()
            lines[:] = [
                line
                for line in text.splitlines()
                if "big-orders" in line and "_bucket" not in line and "_sum" not in line
            ]
            return lines == shown

        await eventually(as_shown, message="the page's output")
    assert lines == shown


def test_docs_scrape_config_is_valid_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(blocks(metrics_section(), "yaml")[0])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["tidings-workers"]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert jobs["tidings-gateway"]["authorization"]["type"] == "Bearer"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_port_is_reported_before_anything_starts(
    tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "TIDINGS_HOME": str(tmp_path / "home")}
        env.pop("TIDINGS_BUS", None)  # nothing may start: not even the embedded bus
        result = subprocess.run(
            [sys.executable, "-m", "tidings.cli", "run", "tests.gateway.run_app:app",
             "--workers", workers, "--metrics-port", str(port)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"metrics cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--metrics-port" in result.stderr
    assert not (tmp_path / "home" / "nats").exists()
    assert not (tmp_path / "home" / "metrics").exists()


@pytest.mark.nats
async def test_a_mounted_gateway_reports_the_agents_it_invoked(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    import uvicorn
    from fastapi import FastAPI

    from tests.gateway.conftest import gateway_app
    from tidings.gateway import create_app
    from tidings.gateway.server import SignalFreeServer

    web = FastAPI()
    api = create_app(gateway_app(), settings_for(nats_url, namespace, tmp_path), gateway_config())
    web.mount("/tidings", api)
    server = SignalFreeServer(uvicorn.Config(web, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for n in range(3):
                r = await http.post(
                    "/tidings/v1/agents/echo/invoke",
                    json={"type": "echo.request", "data": n},
                    headers=auth("alice"),
                )
                assert r.status_code == 200, r.text
            r = await http.get("/tidings/metrics", headers=auth("prom", scopes="metrics"))
            assert r.status_code == 200, r.text
    finally:
        await api.state.gateway.stop()
        server.should_exit = True
        await serving
    samples = parse(r.text)
    assert value(samples, "tidings_events_handled_total", agent="echo") == 3
    assert value(samples, "tidings_handler_seconds_count", agent="echo") == 3
    route = {"route": "/v1/agents/{name}/invoke", "status": "2xx"}
    assert value(samples, "tidings_gateway_requests_total", **route) == 3


@pytest.mark.slow
def test_a_hung_worker_costs_its_own_numbers_not_the_merged_scrape(tmp_path: Path) -> None:
    """`--workers N --metrics-port`: a worker that stopped answering (SIGSTOP, swapping)
    or was killed -9 is left out, and the others' numbers answer within Prometheus's
    default scrape timeout (10 s); a worker's own read waited 10 s, so the whole scrape
    timed out."""
    import http.server
    import threading

    name = "tidings_events_handled_total"
    lines = [f"# TYPE {name} counter", f'{name}{{agent="a"}} 5']
    text = "\n".join([*lines, ""]).encode()

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: Any) -> None:
            pass

    live = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=live.serve_forever, daemon=True).start()
    hung = socket.socket()  # accepts connections into its backlog, never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    (tmp_path / "1.url").write_text(f"http://127.0.0.1:{live.server_port}/metrics")
    (tmp_path / "2.url").write_text(f"http://127.0.0.1:{hung.getsockname()[1]}/metrics")
    (tmp_path / "3.url").write_text(f"http://127.0.0.1:{free_port()}/metrics")  # killed -9
    url, stop = serve_merged("127.0.0.1", 0, tmp_path)
    try:
        for _ in range(2):  # and again: nothing is left waiting from the first scrape
            answer = httpx.get(url, timeout=9.5)  # Prometheus gives up at 10 s
            assert answer.status_code == 200
            merged = parse(answer.text)
            assert value(merged, "tidings_events_handled_total", agent="a") == 5
    finally:
        stop()
        live.shutdown()
        live.server_close()
        hung.close()


@pytest.mark.nats
@pytest.mark.slow
async def test_scrapes_while_events_flow_parse_and_never_go_back(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """Scrapes from the server's thread while thousands of events flow: each one parses
    and answers, and no counter ever reads lower than on the scrape before."""
    app = App("busy")

    @app.agent("a", on="x.made")
    async def a(event: Event, ctx: Context) -> None:
        return None

    settings = settings_for(nats_url, namespace, tmp_path)
    scrapes: list[Samples] = []
    async with running(app, settings) as worker, Client(settings) as client:
        url = worker.metrics.serve("127.0.0.1", 0)

        async def scrape() -> None:
            # Ends when the events are all handled; bounded in time and count. A count alone
            # ran out first on a loaded machine, before the worker had handled them all.
            deadline = time.monotonic() + 90
            async with httpx.AsyncClient(timeout=9.5) as http:
                for _ in range(20_000):
                    assert time.monotonic() < deadline, "the events were not all handled"
                    answer = await http.get(url)
                    assert answer.status_code == 200
                    scrapes.append(parse(answer.text))
                    if value(scrapes[-1], "tidings_events_handled_total", agent="a") >= 3000:
                        return
                    await asyncio.sleep(0.02)

        scraping = asyncio.create_task(scrape())
        for n in range(3000):
            await client.publish("x.made", {"n": n})
        await asyncio.wait_for(scraping, 100)
        worker.metrics.close()
    assert len(scrapes) >= 2
    names = ("tidings_events_received_total", "tidings_events_handled_total")
    for name in names:
        seen = [value(s, name, agent="a") for s in scrapes]
        assert seen == sorted(seen), name
    assert value(scrapes[-1], "tidings_events_handled_total", agent="a") == 3000


def test_a_worker_answer_that_does_not_parse_is_left_out_of_the_merge() -> None:
    """A worker cut off mid-answer, or its port taken over by another server after it
    died: the others' numbers still make the merged view (it raised, and the scrape
    failed whole)."""
    name = "tidings_events_handled_total"
    good = f'# TYPE {name} counter\n{name}{{agent="a"}} 5\n'
    for bad in (good + f"{name}{{agent=", "<html>502</html>", good[:50]):
        merged = parse(merge([good, bad, good]).decode())
        assert value(merged, "tidings_events_handled_total", agent="a") == 10, bad
