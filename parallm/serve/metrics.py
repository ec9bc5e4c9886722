"""Prometheus metrics of the server, in a registry of its own (one per app, so tests can run two).

Gauges are read from the engine's last step when `/metrics` is scraped; counters and histograms
are updated as requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from parallm.serve.async_engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_LATENCY_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge(
            "parallm_num_requests_running", "Sequences in the running batch", labels, registry=r
        )
        self.waiting = Gauge(
            "parallm_num_requests_waiting", "Sequences waiting to be scheduled", labels, registry=r
        )
        self.kv_usage = Gauge(
            "parallm_kv_cache_usage_perc",
            "Fraction of KV-cache blocks held by sequences (0..1)",
            labels,
            registry=r,
        )
        self.kv_free = Gauge(
            "parallm_kv_cache_free_blocks", "KV-cache blocks free or evictable", labels, registry=r
        )
        self.kv_total = Gauge(
            "parallm_kv_cache_blocks", "KV-cache blocks in the pool", labels, registry=r
        )
        self.hit_rate = Gauge(
            "parallm_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache over those looked up, since start",
            labels,
            registry=r,
        )
        self.prefix_queries = Gauge(
            "parallm_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache, since start",
            labels,
            registry=r,
        )
        self.prefix_hits = Gauge(
            "parallm_prefix_cache_hits_tokens",
            "Prompt tokens found in the prefix cache, since start",
            labels,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "parallm_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r
        )
        self.generation_tokens = Counter(
            "parallm_generation_tokens", "Tokens generated and sent", labels, registry=r
        )
        self.requests = Counter(
            "parallm_requests",
            "Finished requests by finish reason",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "parallm_time_to_first_token_seconds",
            "Time from arrival to the first token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "parallm_time_per_output_token_seconds",
            "Mean time between output tokens of a request",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "parallm_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.labels = {"model_name": model_name}

    def finished(
        self,
        *,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        """Account one finished choice set (a prompt with its n samples)."""
        lb = self.labels
        self.prompt_tokens.labels(**lb).inc(prompt_tokens)
        self.generation_tokens.labels(**lb).inc(completion_tokens)
        self.requests.labels(**lb, finished_reason=reason).inc()
        if ttft is not None:
            self.ttft.labels(**lb).observe(ttft)
            self.e2e.labels(**lb).observe(e2e)
            if completion_tokens > 1:
                self.tpot.labels(**lb).observe((e2e - ttft) / (completion_tokens - 1))

    def render(self, stats: EngineStats) -> bytes:
        lb = self.labels
        self.running.labels(**lb).set(stats.running)
        self.waiting.labels(**lb).set(stats.waiting)
        self.kv_usage.labels(**lb).set(stats.kv_usage)
        self.kv_free.labels(**lb).set(stats.kv_blocks_free)
        self.kv_total.labels(**lb).set(stats.kv_blocks_total)
        rate = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
        self.hit_rate.labels(**lb).set(rate)
        self.prefix_queries.labels(**lb).set(stats.prefix_queries)
        self.prefix_hits.labels(**lb).set(stats.prefix_hits)
        return generate_latest(self.registry)
