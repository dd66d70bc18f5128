"""`GET /metrics` (Prometheus text, parsed with prometheus_client's own parser) and the same figures
in `/health`: counted against what the responses themselves report."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import KEY, MODEL, Server, ask, loaded, model_dir, wait_idle  # noqa: F401 (fixtures)

from gemma_mlx.server import create_app
from gemma_mlx.server.metrics import Metrics, quantile

httpx = pytest.importorskip("httpx")

TTFT = "gemma_mlx_time_to_first_token_seconds"
TPOT = "gemma_mlx_time_per_output_token_seconds"
STEPS = "gemma_mlx_step_batch_size"


def parse(text: str) -> dict:
    """{(sample name, (label, value) pairs): value} of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# --- the class alone ------------------------------------------------------------------------------


def test_metrics_export_what_they_are_told():
    m = Metrics()
    m.set_waiting(2)
    m.set_running(1)
    m.request_started(prompt_tokens=7, cached_tokens=5)
    m.first_token(0.3)
    for dt in (0.004, 0.015, 0.015):
        m.batch_step(1)
        m.token(dt)
    m.batch_step(3)
    m.request_finished(4, "length")
    m.request_finished(0, "cancelled")
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    s = parse(body.decode())
    assert get(s, "gemma_mlx_requests_waiting") == 2 and get(s, "gemma_mlx_requests_running") == 1
    assert get(s, "gemma_mlx_requests_started_total") == 1
    assert get(s, "gemma_mlx_requests_finished_total", finish_reason="length") == 1
    assert get(s, "gemma_mlx_requests_finished_total", finish_reason="cancelled") == 1
    assert get(s, "gemma_mlx_requests_finished_total", finish_reason="stop") == 0  # exported before use
    assert get(s, "gemma_mlx_prompt_tokens_total") == 7
    assert get(s, "gemma_mlx_cached_prompt_tokens_total") == 5
    assert get(s, "gemma_mlx_generation_tokens_total") == 4
    assert get(s, TTFT + "_count") == 1 and get(s, TTFT + "_sum") == pytest.approx(0.3)
    assert get(s, TTFT + "_bucket", le="0.2") == 0 and get(s, TTFT + "_bucket", le="0.5") == 1
    assert get(s, TPOT + "_count") == 3 and get(s, TPOT + "_sum") == pytest.approx(0.034)
    assert get(s, TPOT + "_bucket", le="0.005") == 1 and get(s, TPOT + "_bucket", le="0.02") == 3
    assert get(s, "gemma_mlx_batch_size") == 3
    assert get(s, STEPS + "_count") == 4 and get(s, STEPS + "_sum") == 6

    snap = m.snapshot()
    assert snap["requests"] == {
        "running": 1,
        "waiting": 2,
        "started": 1,
        "finished": {"stop": 0, "length": 1, "cancelled": 1, "error": 0},
    }
    assert snap["tokens"] == {"prompt": 7, "cached_prompt": 5, "generated": 4}
    ttft = snap["time_to_first_token_seconds"]
    assert ttft["count"] == 1 and ttft["sum"] == pytest.approx(0.3) and ttft["mean"] == pytest.approx(0.3)
    assert 0.2 < ttft["p50"] <= 0.5  # within the bucket that holds the one observation
    assert snap["time_per_output_token_seconds"]["mean"] == pytest.approx(0.034 / 3)
    assert snap["batch_size"] == {"last": 3, "steps": 4, "mean": 1.5}


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()  # with the global registry the second would raise "Duplicated timeseries"
    a.request_started(3, 0)
    assert a.snapshot()["tokens"]["prompt"] == 3 and b.snapshot()["tokens"]["prompt"] == 0
    empty = b.snapshot()["time_to_first_token_seconds"]
    assert empty == {"count": 0, "sum": 0.0, "mean": None, "p50": None, "p95": None}


def test_quantile_interpolates_within_buckets_like_histogram_quantile():
    inf = float("inf")
    buckets = [(1.0, 2.0), (2.0, 6.0), (inf, 8.0)]  # 2 in (0, 1], 4 in (1, 2], 2 above 2
    assert quantile(0.5, buckets) == pytest.approx(1.5)  # rank 4: halfway through (1, 2]
    assert quantile(0.25, buckets) == pytest.approx(1.0)  # rank 2: the top of the first bucket
    assert quantile(0.1, buckets) == pytest.approx(0.4)  # rank 0.8 of 2 in (0, 1]
    assert quantile(0.95, buckets) == 2.0  # in +Inf: the highest finite bound
    assert quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) is None


def test_reports_from_several_threads_all_count():
    m = Metrics()

    def work():
        for _ in range(500):
            m.token(0.01)
            m.request_started(2, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["time_per_output_token_seconds"]["count"] == 2000
    assert snap["tokens"] == {"prompt": 4000, "cached_prompt": 2000, "generated": 0}


# --- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(loaded):  # noqa: F811 (the fixture imported above)
    model, processor = loaded
    # one request at a time: a second one shows as waiting (batching is tested in test_batch.py)
    srv = Server(create_app(model, processor, model_id=MODEL, api_key=KEY, max_concurrency=1))
    yield srv
    srv.close()


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics")  # no API key: like /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def test_metrics_count_what_the_responses_report(server):
    wait_idle(server)
    before = scrape(server)
    assert get(before, "gemma_mlx_requests_running") == 0 and get(before, "gemma_mlx_requests_waiting") == 0
    client = server.client()
    usages, reasons = [], []
    r = ask(client, "Count the metrics", max_tokens=5)
    usages.append(r.usage)
    reasons.append(r.choices[0].finish_reason)
    # the same prompt again, streamed: it resumes from the prefix cache
    chunks = list(
        ask(client, "Count the metrics", max_tokens=4, stream=True, stream_options={"include_usage": True})
    )
    usages.append(chunks[-1].usage)
    reasons += [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    t = client.completions.create(model=MODEL, prompt="Metrics as text", max_tokens=3, temperature=0)
    usages.append(t.usage)
    reasons.append(t.choices[0].finish_reason)
    wait_idle(server)
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    cached = sum(u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0 for u in usages)
    prompt = sum(u.prompt_tokens for u in usages) - cached
    generated = sum(u.completion_tokens for u in usages)
    assert cached > 0 and generated == 12  # the streamed request reused the first one's prompt
    assert delta("gemma_mlx_prompt_tokens_total") == prompt
    assert delta("gemma_mlx_cached_prompt_tokens_total") == cached
    assert delta("gemma_mlx_generation_tokens_total") == generated
    assert delta("gemma_mlx_requests_started_total") == 3
    for reason in set(reasons):
        assert delta("gemma_mlx_requests_finished_total", finish_reason=reason) == reasons.count(reason)
    assert delta(TTFT + "_count") == 3 and delta(TTFT + "_sum") > 0
    assert delta(TTFT + "_bucket", le="+Inf") == 3
    assert delta(TPOT + "_count") == generated - 3  # one per token after each request's first
    # one decode step per token, and per request one that feeds its last prompt token; one row each
    assert delta(STEPS + "_count") == generated + 3 and delta(STEPS + "_sum") == generated + 3
    assert get(after, "gemma_mlx_batch_size") == 1
    assert get(after, "gemma_mlx_requests_running") == 0 and get(after, "gemma_mlx_requests_waiting") == 0

    # /health: the same figures, as JSON, without a key either
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["requests"]["running"] == 0 and health["requests"]["waiting"] == 0
    assert health["requests"]["started"] == get(after, "gemma_mlx_requests_started_total")
    for reason, n in health["requests"]["finished"].items():
        assert n == get(after, "gemma_mlx_requests_finished_total", finish_reason=reason)
    assert health["tokens"] == {
        "prompt": get(after, "gemma_mlx_prompt_tokens_total"),
        "cached_prompt": get(after, "gemma_mlx_cached_prompt_tokens_total"),
        "generated": get(after, "gemma_mlx_generation_tokens_total"),
    }
    for key, name in (("time_to_first_token_seconds", TTFT), ("time_per_output_token_seconds", TPOT)):
        assert health[key]["count"] == get(after, name + "_count")
        assert health[key]["sum"] == pytest.approx(get(after, name + "_sum"))
    assert health["batch_size"]["steps"] == get(after, STEPS + "_count")
    # the API itself still wants the key
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_running_and_waiting_while_a_request_generates(server):
    wait_idle(server)
    before = scrape(server)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "stream": True}
    queued = []
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as running:
        lines = running.iter_lines()  # (kept: dropping the iterator closes the stream)
        next(lines)  # generating now
        t = threading.Thread(target=lambda: queued.append(ask(server.client(), "Hi", max_tokens=2)))
        t.start()
        deadline = time.time() + 20
        while True:
            s = scrape(server)
            if get(s, "gemma_mlx_requests_waiting") == 1:
                break
            assert time.time() < deadline, "the second request never showed as waiting"
            time.sleep(0.02)
        assert get(s, "gemma_mlx_requests_running") == 1
        assert httpx.get(server.url + "/health").json()["requests"]["running"] == 1
    t.join(60)  # the stream was dropped: its generation is cancelled, the queued request served
    assert queued and queued[0].usage.completion_tokens == 2
    wait_idle(server)
    after = scrape(server)
    assert get(after, "gemma_mlx_requests_running") == 0 and get(after, "gemma_mlx_requests_waiting") == 0

    def delta(name: str, **labels) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("gemma_mlx_requests_finished_total", finish_reason="cancelled") == 1
    assert delta("gemma_mlx_requests_finished_total", finish_reason="length") == 1
    assert delta("gemma_mlx_requests_started_total") == 2
    # the cancelled stream's tokens count too (they were generated), each timed once
    generated = delta("gemma_mlx_generation_tokens_total")
    assert generated > 2 and delta(TTFT + "_count") + delta(TPOT + "_count") == generated
