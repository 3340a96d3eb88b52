"""Prometheus metrics for one replica, served at GET /metrics in the text format.

Counters and histograms are recorded as requests run; engine gauges (running and waiting
sequences, free state slots and KV blocks, cache usage) are read from the replica at scrape
time. Each replica has its own registry, so a scrape sees the replica that answered it.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "deltaray"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, replica):
        self.replica = replica
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "generated tokens",
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.aborted = Counter(f"{PREFIX}_aborted_requests", "requests the client left",
                               registry=r)
        self.gauges = {name: Gauge(f"{PREFIX}_{name}", help, registry=r) for name, help in (
            ("running_sequences", "sequences running in the engine"),
            ("waiting_sequences", "sequences waiting for the engine"),
            ("free_state_slots", "free GDN state slots"), ("state_slots", "GDN state slots"),
            ("free_kv_blocks", "free KV blocks"), ("kv_blocks", "KV blocks"),
            ("cache_usage", "fraction of KV blocks in use"))}

    def render(self) -> bytes:
        s = self.replica.stats()
        values = {"running_sequences": s.running, "waiting_sequences": s.waiting,
                  "free_state_slots": s.free_slots, "state_slots": s.num_slots,
                  "free_kv_blocks": s.free_blocks, "kv_blocks": s.num_blocks,
                  "cache_usage": s.cache_usage}
        for name, value in values.items():
            self.gauges[name].set(value)
        return generate_latest(self.registry)
