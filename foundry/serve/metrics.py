"""Prometheus metrics of one server, in their own registry (so that two apps in one process do not clash)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from foundry.infer.speculative import SpeculationStats
from foundry.serve.backend import Stats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Requests running and waiting, KV-cache use, prefix-cache hits, tokens in and out, and latencies.

    speculation: the engine's speculative-decoding counters (scheduler.spec_stats), read when scraped; the
    foundry_spec_* series appear while it gives some (None: the engine does not speculate)."""

    def __init__(self, stats: Callable[[], Stats], aborted: Callable[[], int],
                 speculation: Callable[[], SpeculationStats | None] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        # Running and waiting count sequences (a request with n choices is n), as the scheduler does.
        Gauge("foundry_requests_running", "Sequences generating now (each holds a KV-cache slot)", registry=r
              ).set_function(lambda: stats().running)
        Gauge("foundry_requests_waiting", "Sequences admitted and waiting for a KV-cache slot", registry=r
              ).set_function(lambda: stats().waiting)
        Gauge("foundry_kv_cache_used_tokens", "KV-cache positions held by running sequences", registry=r
              ).set_function(lambda: stats().kv_used_tokens)
        Gauge("foundry_kv_cache_capacity_tokens", "KV-cache positions the pool holds in all", registry=r
              ).set_function(lambda: stats().kv_capacity_tokens)
        Gauge("foundry_kv_cache_prefix_cached_tokens", "KV-cache positions the prefix cache keeps in idle slots",
              registry=r).set_function(lambda: stats().kv_cached_tokens)
        r.register(_HitTokens(stats))
        if speculation is not None:
            r.register(_Speculation(speculation))
        Gauge("foundry_requests_aborted", "Requests stopped before their end since start (client gone, "
              "or shutdown)", registry=r).set_function(aborted)
        self.requests = Counter("foundry_requests", "Requests answered, by route and HTTP status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("foundry_prompt_tokens", "Prompt tokens of finished choices", registry=r)
        self.generation_tokens = Counter("foundry_generation_tokens", "Tokens generated for finished choices",
                                         registry=r)
        self.sampled_tokens = Counter("foundry_sampled_tokens", "Tokens sampled, counted as they stream (choices "
                                      "still generating included): its rate is the server's tokens/s", registry=r)
        self.ttft = Histogram("foundry_time_to_first_token_seconds", "From a request's arrival (queueing "
                              "included) to its first output text", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("foundry_inter_token_latency_seconds", "Between consecutive output pieces of a "
                             "choice (one per token, unless a token's text is held back, e.g. inside a stop "
                             "string's prefix)", buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _HitTokens:
    """A counter read from the backend when scraped (prometheus_client counters cannot take a function)."""

    def __init__(self, stats: Callable[[], Stats]):
        self.stats = stats

    def collect(self):  # prometheus_client's collector protocol
        """The prefix-cache hit tokens so far."""
        yield CounterMetricFamily("foundry_prefix_cache_hit_tokens", "Prompt tokens of finished choices whose "
                                  "keys/values came from the prefix cache", value=self.stats().prefix_cache_hit_tokens)


class _Speculation:
    """Speculative decoding's counters and ratios, read from the scheduler when scraped (one snapshot)."""

    def __init__(self, stats: Callable[[], SpeculationStats | None]):
        self.stats = stats

    def collect(self):  # prometheus_client's collector protocol
        """Drafted and accepted tokens, verification steps, the acceptance rate and accepted tokens per step."""
        s = self.stats()
        if s is None:
            return
        yield CounterMetricFamily("foundry_spec_draft_tokens", "Tokens proposed by the drafter (n-gram lookup "
                                  "or draft model) for the model to verify", value=s.drafted)
        yield CounterMetricFamily("foundry_spec_accepted_tokens", "Drafted tokens equal to the model's own "
                                  "choice, so kept", value=s.accepted)
        yield CounterMetricFamily("foundry_spec_verify_steps", "Decode steps that verified drafts (one model "
                                  "call each, for all speculating rows)", value=s.steps)
        yield CounterMetricFamily("foundry_spec_verified_rows", "Sequences' verifications (a sequence with "
                                  "drafts in a verify step)", value=s.rows)
        yield GaugeMetricFamily("foundry_spec_acceptance_rate", "Accepted over drafted tokens since start",
                                value=s.acceptance_rate)
        yield GaugeMetricFamily("foundry_spec_mean_accepted_tokens", "Accepted drafts per sequence per verify "
                                "step since start (each also gains one token of the model's own)",
                                value=s.mean_accepted)
