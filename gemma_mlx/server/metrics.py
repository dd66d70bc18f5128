"""The server's figures: Prometheus metrics for `GET /metrics`, and the same figures as JSON for `/health`.

The generation worker reports what happens (`set_running`, `request_started`, `first_token`,
`token`, `batch_step`, `request_finished`, ...); the HTTP thread renders. `prometheus_client`'s
metrics are thread-safe, so the two threads need no lock of ours. Each `Metrics` owns its own
registry (not prometheus_client's global one), so several apps in one process never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets, in seconds, 1-2-5 per decade. One decode step of the 12B at 4 bits is about
# 15-40 ms on a laptop GPU and a few ms for small models; the same step takes seconds on a slow
# CPU (this repository's 2-core test box). Per-token buckets run from 2 ms to 20 s. The first token
# waits for the queue and the whole prefill, which on a CPU can take minutes for a long prompt, so
# its buckets go on to 10 minutes.
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
FIRST_TOKEN_BUCKETS = (
    *(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    *(10.0, 20.0, 50.0, 100.0, 200.0, 600.0),
)
# Rows per decode step: powers of two up to far beyond what one Mac's memory admits.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# the finish reasons the worker gives, exported at 0 from the start so that rates exist at once
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Metrics:
    """Counters, gauges and histograms of one server, in their own `CollectorRegistry`.

    Exported names (the `_total`, `_bucket`, `_count`, `_sum` and `_created` samples are
    prometheus_client's):

    - `gemma_mlx_requests_running`, `gemma_mlx_requests_waiting`: gauges, requests generating now
      and requests queued for the model (submitted, not yet started).
    - `gemma_mlx_requests_started_total`: requests whose prefill began.
    - `gemma_mlx_requests_finished_total{finish_reason}`: every submitted request ends here once
      (`stop`, `length`, `cancelled`, also when cancelled while waiting, `error`).
    - `gemma_mlx_prompt_tokens_total`: prompt tokens prefilled; `gemma_mlx_cached_prompt_tokens_total`:
      prompt tokens reused from the prefix cache (their sum is the prompts' length).
    - `gemma_mlx_generation_tokens_total`: tokens generated.
    - `gemma_mlx_time_to_first_token_seconds`: histogram, submission to first generated token.
    - `gemma_mlx_time_per_output_token_seconds`: histogram, time between consecutive generated
      tokens of one request (its count: tokens after each request's first).
    - `gemma_mlx_batch_size`: gauge, rows in the last decode step; `gemma_mlx_step_batch_size`:
      histogram of the rows of each decode step (its count: decode steps).
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._running = Gauge("gemma_mlx_requests_running", "Requests generating now.", registry=r)
        self._waiting = Gauge("gemma_mlx_requests_waiting", "Requests queued for the model.", registry=r)
        self._started = Counter("gemma_mlx_requests_started", "Requests whose prefill began.", registry=r)
        self._finished = Counter(
            "gemma_mlx_requests_finished", "Requests ended, by finish reason.", ["finish_reason"], registry=r
        )
        for reason in FINISH_REASONS:
            self._finished.labels(reason)
        self._prompt = Counter("gemma_mlx_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self._cached = Counter(
            "gemma_mlx_cached_prompt_tokens", "Prompt tokens reused from the prefix cache.", registry=r
        )
        self._generated = Counter("gemma_mlx_generation_tokens", "Tokens generated.", registry=r)
        self._first = Histogram(
            "gemma_mlx_time_to_first_token_seconds",
            "Seconds from a request's submission to its first generated token.",
            registry=r,
            buckets=FIRST_TOKEN_BUCKETS,
        )
        self._token = Histogram(
            "gemma_mlx_time_per_output_token_seconds",
            "Seconds between consecutive generated tokens of one request.",
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self._batch = Gauge("gemma_mlx_batch_size", "Rows in the last decode step.", registry=r)
        self._steps = Histogram(
            "gemma_mlx_step_batch_size", "Rows in each decode step.", registry=r, buckets=BATCH_BUCKETS
        )

    # --- what the generation worker reports ----------------------------------------------------

    def set_running(self, n: int) -> None:
        """`n` requests are generating (prefilling or decoding) now."""
        self._running.set(n)

    def set_waiting(self, n: int) -> None:
        """`n` requests are queued for the model (submitted, not started)."""
        self._waiting.set(n)

    def request_started(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request starts: `prompt_tokens` of its prompt will be prefilled, `cached_tokens` came
        from the prefix cache."""
        self._started.inc()
        self._prompt.inc(prompt_tokens)
        self._cached.inc(cached_tokens)

    def first_token(self, seconds: float) -> None:
        """A request's first generated token, `seconds` after its submission."""
        self._first.observe(seconds)

    def token(self, seconds: float) -> None:
        """A later generated token, `seconds` after the request's previous one."""
        self._token.observe(seconds)

    def request_finished(self, generated_tokens: int, finish_reason: str) -> None:
        """A submitted request ended (`finish_reason`: stop, length, cancelled or error) after
        generating `generated_tokens`."""
        self._generated.inc(generated_tokens)
        self._finished.labels(finish_reason).inc()

    def batch_step(self, size: int) -> None:
        """A decode step ran with `size` rows."""
        self._batch.set(size)
        self._steps.observe(size)

    # --- what the HTTP side reads ----------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict:
        """The same figures as JSON, for `/health`, read from the same registry:

        `requests`: running, waiting, started, finished (per finish reason); `tokens`: prompt
        (prefilled), cached_prompt, generated; `time_to_first_token_seconds` and
        `time_per_output_token_seconds`: count, sum, mean, and p50/p95 estimated from the
        histogram's buckets (linear within a bucket, as Prometheus's `histogram_quantile`; None
        without observations); `batch_size`: last, steps (decode steps), mean (rows per step)."""
        values: dict[str, float] = {}
        finished: dict[str, int] = {}
        buckets: dict[str, list[tuple[float, float]]] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == "gemma_mlx_requests_finished_total":
                    finished[s.labels["finish_reason"]] = int(s.value)
                elif s.name.endswith("_bucket"):
                    buckets.setdefault(s.name[: -len("_bucket")], []).append((float(s.labels["le"]), s.value))
                else:
                    values[s.name] = s.value

        def latency(name: str) -> dict:
            count, total = int(values[name + "_count"]), values[name + "_sum"]
            return {
                "count": count,
                "sum": total,
                "mean": total / count if count else None,
                "p50": quantile(0.5, buckets[name]),
                "p95": quantile(0.95, buckets[name]),
            }

        steps = int(values["gemma_mlx_step_batch_size_count"])
        return {
            "requests": {
                "running": int(values["gemma_mlx_requests_running"]),
                "waiting": int(values["gemma_mlx_requests_waiting"]),
                "started": int(values["gemma_mlx_requests_started_total"]),
                "finished": finished,
            },
            "tokens": {
                "prompt": int(values["gemma_mlx_prompt_tokens_total"]),
                "cached_prompt": int(values["gemma_mlx_cached_prompt_tokens_total"]),
                "generated": int(values["gemma_mlx_generation_tokens_total"]),
            },
            "time_to_first_token_seconds": latency("gemma_mlx_time_to_first_token_seconds"),
            "time_per_output_token_seconds": latency("gemma_mlx_time_per_output_token_seconds"),
            "batch_size": {
                "last": int(values["gemma_mlx_batch_size"]),
                "steps": steps,
                "mean": values["gemma_mlx_step_batch_size_sum"] / steps if steps else None,
            },
        }


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The `q` quantile estimated from cumulative `(upper bound, count)` buckets (the last one +Inf),
    as Prometheus's `histogram_quantile` does: linear within the bucket it falls in (from 0 for the
    first one), the highest finite bound when it falls in the +Inf bucket; None without counts."""
    total = buckets[-1][1]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
