"""Prometheus metrics of the server, in a registry of its own (one per app, so tests can run two).

Gauges are read from the engine's last step when `/metrics` is scraped (labelled with the
served model's name); counters and histograms are updated as requests finish, labelled with the
model each request named: the base or one of its LoRA adapters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from parallm.serve.async_engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_LATENCY_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)


# EngineStats-derived value -> (metric name, help)
_GAUGES = {
    "running": ("parallm_num_requests_running", "Sequences in the running batch"),
    "waiting": ("parallm_num_requests_waiting", "Sequences waiting to be scheduled"),
    "kv_usage": (
        "parallm_kv_cache_usage_perc",
        "Fraction of KV-cache blocks held by sequences (0..1)",
    ),
    "kv_blocks_free": ("parallm_kv_cache_free_blocks", "KV-cache blocks free or evictable"),
    "kv_blocks_total": ("parallm_kv_cache_blocks", "KV-cache blocks in the pool"),
    "hit_rate": (
        "parallm_prefix_cache_hit_rate",
        "Prompt tokens found in the prefix cache over those looked up, since start",
    ),
    "prefix_queries": (
        "parallm_prefix_cache_queries_tokens",
        "Prompt tokens looked up in the prefix cache, since start",
    ),
    "prefix_hits": (
        "parallm_prefix_cache_hits_tokens",
        "Prompt tokens found in the prefix cache, since start",
    ),
}


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.gauges = {
            attr: Gauge(name, doc, labels, registry=r) for attr, (name, doc) in _GAUGES.items()
        }
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

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r)

        self.ttft = histogram(
            "parallm_time_to_first_token_seconds", "Time from arrival to the first token"
        )
        self.tpot = histogram(
            "parallm_time_per_output_token_seconds", "Mean time between a choice's output tokens"
        )
        self.e2e = histogram(
            "parallm_e2e_request_latency_seconds", "Time from arrival to the last token"
        )
        # Videos (POST /v1/videos), labelled with the video model's name.
        self.video_frames = Counter(
            "parallm_video_frames", "Frames of the videos generated", labels, registry=r
        )
        self.video_requests = Counter(
            "parallm_video_requests",
            "Finished video jobs by status (completed, failed, cancelled)",
            [*labels, "status"],
            registry=r,
        )
        self.video_e2e = Histogram(
            "parallm_video_e2e_seconds",
            "Time from a video job's creation to its end (queue included)",
            labels,
            buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
            registry=r,
        )
        self.labels = {"model_name": model_name}

    def finished(
        self,
        *,
        model: str,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        """Account one finished choice (one of the n samples of one prompt) of `model`."""
        lb = {"model_name": model}
        self.prompt_tokens.labels(**lb).inc(prompt_tokens)
        self.generation_tokens.labels(**lb).inc(completion_tokens)
        self.requests.labels(**lb, finished_reason=reason).inc()
        if ttft is not None:
            self.ttft.labels(**lb).observe(ttft)
            self.e2e.labels(**lb).observe(e2e)
            if completion_tokens > 1:
                self.tpot.labels(**lb).observe((e2e - ttft) / (completion_tokens - 1))

    def video_finished(self, *, model: str, status: str, frames: int, e2e: float) -> None:
        """Account one video job that ended: `frames` generated (0 unless completed)."""
        self.video_frames.labels(model_name=model).inc(frames)
        self.video_requests.labels(model_name=model, status=status).inc()
        self.video_e2e.labels(model_name=model).observe(e2e)

    def render(self, stats: EngineStats) -> bytes:
        for attr, gauge in self.gauges.items():
            gauge.labels(**self.labels).set(getattr(stats, attr))
        return generate_latest(self.registry)
