"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Prefill tokens are counted as ``cached`` (their KV was reused) or ``computed``; the KV hit rate is
``cached / (cached + computed)``. Per-shard retrieval latency comes from the coordinator at scrape
time (sum and count of its nodes' answer times), so it covers every request the tier served.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, tier_info: Callable[[], dict | None] | None = None, tier_processes: Callable[[], list[dict]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chameleon_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.latency = Histogram(
            "chameleon_request_seconds", "HTTP request latency by route.", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram("chameleon_ttft_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_speed = Histogram(
            "chameleon_decode_tokens_per_second",
            "Decode speed per request.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.generated_tokens = Counter("chameleon_generated_tokens", "New tokens generated.", registry=r)
        self.prefill_tokens = Counter("chameleon_prefill_tokens", "Prompt tokens by whether their KV was reused.", ["kind"], registry=r)
        self.retrieval = Histogram(
            "chameleon_retrieval_seconds", "Retrieval (coarse + tier) per search.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("chameleon_queue_depth", "Sequences waiting for a place in the decoding batch.", registry=r)
        self.batch_size = Gauge("chameleon_batch_size", "Sequences being decoded together.", registry=r)
        self.inflight = Gauge("chameleon_inflight_requests", "Requests admitted and not yet finished.", registry=r)
        self.rejected = Counter("chameleon_rejected_requests", "Requests refused with 429 (over the concurrency limit).", registry=r)
        self.reloads = Counter(
            "chameleon_index_reloads", "POST /admin/reload by outcome: reloaded, unchanged, refused.", ["outcome"], registry=r
        )
        self.passages = Gauge("chameleon_index_passages", "Passages in the version of the index served.", registry=r)
        if tier_info is not None:
            r.register(_TierCollector(tier_info))
        if tier_processes is not None:
            r.register(_SupervisionCollector(tier_processes))

    def watch_cache(self, doc_cache) -> None:
        """Export the document KV cache's counters (nothing when there is no cache)."""
        if doc_cache is not None:
            self.registry.register(_CacheCollector(doc_cache))

    def watch_speculation(self, speculation) -> None:
        """Export the speculative prefills' counters (nothing when speculation is off)."""
        if speculation is not None:
            self.registry.register(_SpeculationCollector(speculation))


class _SpeculationCollector:
    """Speculative prefills on the tier's early top-k, by outcome."""

    def __init__(self, speculation):
        self.speculation = speculation

    def describe(self):
        return []

    def collect(self):
        outcomes = CounterMetricFamily("chameleon_speculative_prefills", "Speculative prefills by outcome.", labels=["outcome"])
        for outcome, count in dict(self.speculation.stats).items():
            outcomes.add_metric([outcome], count)
        yield outcomes


class _CacheCollector:
    """Prompt tokens by where their KV came from: the device tier, the host tier, or computed."""

    def __init__(self, doc_cache):
        self.doc_cache = doc_cache

    def describe(self):
        return []

    def collect(self):
        stats = dict(self.doc_cache.stats)
        tokens = CounterMetricFamily("chameleon_kv_cache_tokens", "Document KV cache: prompt tokens by source.", labels=["source"])
        for source in ("device_hit", "host_hit", "computed"):
            tokens.add_metric([source], stats[f"{source}_tokens"])
        total = sum(stats[f"{source}_tokens"] for source in ("device_hit", "host_hit", "computed"))
        hit_rate = GaugeMetricFamily(
            "chameleon_kv_cache_hit_rate", "Share of prompt tokens whose KV came from each cache tier.", labels=["tier"]
        )
        for tier in ("device", "host"):
            hit_rate.add_metric([tier], stats[f"{tier}_hit_tokens"] / total if total else 0.0)
        yield hit_rate
        # a restarted speculative prefill looks the cache up twice, once per prompt it computes
        lookups = CounterMetricFamily("chameleon_kv_cache_lookups", "Prompts looked up in the document KV cache.", labels=["outcome"])
        lookups.add_metric(["used"], stats["lookups"])
        lookups.add_metric(["bypassed"], stats["bypassed"])
        yield tokens
        yield lookups


class _TierCollector:
    """Per-node figures from the coordinator's INFO, read at scrape time."""

    def __init__(self, tier_info: Callable[[], dict | None]):
        self.tier_info = tier_info

    def describe(self):
        return []  # collected lazily: never call the tier at registration

    def collect(self):
        info = self.tier_info()
        latency = SummaryMetricFamily(
            "chameleon_shard_latency_seconds", "Retrieval node answer time, per node.", labels=["shard", "endpoint"]
        )
        alive = GaugeMetricFamily("chameleon_shard_node_alive", "1 when the coordinator sees the node alive.", labels=["shard", "endpoint"])
        inflight = GaugeMetricFamily(
            "chameleon_shard_node_inflight",
            "Sub-requests the coordinator has sent the node and not had answered (the retrieval tier's autoscaling signal).",
            labels=["shard", "endpoint"],
        )
        for node in (info or {}).get("nodes", []):
            labels = ["" if node["shard"] is None else str(node["shard"]), node["endpoint"]]
            latency.add_metric(labels, count_value=node.get("answered", 0), sum_value=node.get("answer_s", 0.0))
            alive.add_metric(labels, 1.0 if node["alive"] else 0.0)
            inflight.add_metric(labels, node.get("inflight", 0) + node.get("waiting", 0))
        yield latency
        yield alive
        yield inflight


class _SupervisionCollector:
    """Restarts of the tier processes this server started and keeps (``chameleon.supervisor``), by
    tier and shard, and the processes given up on."""

    def __init__(self, tier_processes: Callable[[], list[dict]]):
        self.tier_processes = tier_processes

    def describe(self):
        return []

    def collect(self):
        restarts = CounterMetricFamily(
            "chameleon_tier_restarts", "Tier processes restarted by this server, by tier and shard.", labels=["tier", "shard"]
        )
        failed = GaugeMetricFamily(
            "chameleon_tier_processes_failed", "Tier processes that kept failing and are no longer restarted.", labels=["tier", "shard"]
        )
        totals: dict[tuple[str, str], list[int]] = {}
        for child in self.tier_processes():
            labels = (child["tier"], "" if child["shard"] is None else str(child["shard"]))
            total = totals.setdefault(labels, [0, 0])
            total[0] += child["restarts"]
            total[1] += child["state"] == "failed"
        for labels, (count, gave_up) in sorted(totals.items()):
            restarts.add_metric(list(labels), count)
            failed.add_metric(list(labels), gave_up)
        yield restarts
        yield failed
