"""Prometheus metrics, named like vLLM's under `streampage:`.

Each server owns a private registry (tests run several servers in one process). Engine gauges and
counters are read from `engine.stats` at scrape time, so the step loop never touches metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from streampage.outputs import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                      0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)

# (metric name, help, EngineStats attribute or property)
_ENGINE_GAUGES = (
    ("num_requests_running", "Requests running in the engine's batch.", "num_running"),
    ("num_requests_waiting", "Requests waiting for KV blocks.", "num_waiting"),
    ("num_requests_swapped", "Requests swapped out to CPU memory.", "num_swapped"),
    ("kv_cache_usage_perc", "Share of KV blocks held by live sequences (1 = full).", "kv_usage"),
    ("kv_blocks_total", "KV blocks in the GPU pool.", "kv_blocks_total"),
    ("kv_blocks_used", "KV blocks held by live sequences.", "kv_blocks_used"),
    ("kv_blocks_shared", "Used KV blocks held by more than one sequence.", "kv_blocks_shared"),
    ("kv_blocks_cached", "Free KV blocks still holding a reusable prefix.", "kv_blocks_cached"),
    ("kv_blocks_empty", "Free KV blocks holding nothing.", "kv_blocks_empty"),
    ("kv_blocks_free", "Free KV blocks (cached + empty).", "kv_blocks_free"),
    ("cpu_blocks_total", "Blocks in the CPU swap space.", "cpu_blocks_total"),
    ("cpu_blocks_used", "Swap-space blocks in use.", "cpu_blocks_used"),
)
_SERVER_GAUGES = (
    ("connections", "Open WebSocket connections."),
    ("server_queued_requests", "Accepted requests that have not produced a token yet."),
    ("server_queued_prompt_tokens", "Prompt tokens of those requests."),
    ("server_live_requests", "Requests between response.create and response.done, all sockets."),
)
_ENGINE_COUNTERS = (
    ("num_preemptions", "Preemptions of sequence groups.", "num_preemptions_total"),
    ("prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
    ("generation_tokens", "Tokens generated.", "generation_tokens_total"),
    ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", "cached_prompt_tokens_total"),
    ("engine_steps", "Engine steps run.", "steps_total"),
)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_rejected = Counter(
            "streampage:requests_rejected", "Error frames sent and connections refused, by error code or HTTP reason.",
            ["reason"], registry=r)
        self.request_success = Counter(
            "streampage:request_success", "Requests ended, by the finish reason of their first choice.",
            ["finish_reason"], registry=r)
        self.slow_client_disconnects = Counter(
            "streampage:slow_client_disconnects", "Sockets closed (1008) because the client fell behind.",
            registry=r)
        self.time_to_first_token = Histogram(
            "streampage:time_to_first_token_seconds", "From receiving a request to its first token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        # Observed for every streamed token: prometheus_client's Histogram.observe (a lock and a bucket
        # scan per call) cost more per token than the rest of the metrics; this one is read at scrape.
        self.inter_token_latency = TokenGapHistogram(_TOKEN_GAP_BUCKETS)
        self.e2e_request_latency = Histogram(
            "streampage:e2e_request_latency_seconds", "From receiving a request to its response.done.",
            buckets=_E2E_BUCKETS, registry=r)
        r.register(self.inter_token_latency)
        self._live = _LiveCollector()
        r.register(self._live)

    def watch(self, engine_stats: Callable[[], EngineStats | None],
              server_gauges: Callable[[], dict[str, float]]) -> None:
        """Read these at every scrape: the engine's latest stats and the server's own gauges
        (a value for each name in `_SERVER_GAUGES`)."""
        self._live.engine_stats = engine_stats
        self._live.server_gauges = server_gauges

    def observe_token_gap(self, seconds: float, tokens: int) -> None:
        """`tokens` arrived together `seconds` after the previous ones: each counts an equal share."""
        self.inter_token_latency.observe(seconds / tokens, tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenGapHistogram(Collector):
    """A histogram for the event loop alone (no lock): per observation a bisect and two additions."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count `value` `times` times."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("streampage:inter_token_latency_seconds", "Time between tokens of one choice.",
                                    buckets=buckets, sum_value=self.sum)


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.engine_stats: Callable[[], EngineStats | None] = lambda: None
        self.server_gauges: Callable[[], dict[str, float]] = dict

    def collect(self) -> Iterator[Metric]:
        values = self.server_gauges()
        for name, help_text in _SERVER_GAUGES:
            if name in values:
                yield GaugeMetricFamily(f"streampage:{name}", help_text, value=values[name])
        stats = self.engine_stats()
        if stats is None:
            return
        for name, help_text, attribute in _ENGINE_GAUGES:
            yield GaugeMetricFamily(f"streampage:{name}", help_text, value=getattr(stats, attribute))
        for name, help_text, attribute in _ENGINE_COUNTERS:
            yield CounterMetricFamily(f"streampage:{name}", help_text, value=getattr(stats, attribute))
