"""Prometheus metrics of one router: generations, tokens, per-token latency, expert calls, live mesh state.

Each router has its own CollectorRegistry, found from its expert Registry (so tests that run several
routers in one process keep them apart). Generations count into it on the per-token path; the
mesh state (experts by state, RTT, tokens served, halt) is read from the registry and governance
only when /metrics is scraped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: they double every counter for nothing

# one token is one round trip to K experts: milliseconds on loopback, seconds on a slow mesh
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def outcome_kind(outcome: str) -> str:
    """A bounded label for a call outcome: ok, late, error:<grpc code> or rejected (its reason dropped)."""
    if outcome.startswith("rejected"):
        return "rejected"
    return outcome


class RouterMetrics:
    """The router's counters, histograms and gauges on a registry of their own."""

    def __init__(self) -> None:
        """Create every metric on a fresh CollectorRegistry."""
        r = self.registry = CollectorRegistry()
        self.generations = Counter("mesh_router_generations", "Generations finished, by finish reason "
                                   "(stop, length, eos, halted, error)", ["finish_reason"], registry=r)
        self.refused = Counter("mesh_router_generations_refused", "Generate calls refused before the first "
                               "token, by gRPC status", ["code"], registry=r)
        self.prompt_tokens = Counter("mesh_router_prompt_tokens", "Prompt tokens of started generations", registry=r)
        self.completion_tokens = Counter("mesh_router_completion_tokens", "Tokens generated", registry=r)
        self.rounds = Counter("mesh_router_rounds", "Round trips to the experts (tokens per round = "
                              "completion_tokens / rounds)", registry=r)
        self.draft_tokens = Counter("mesh_router_draft_tokens", "Drafted tokens, by whether the mixture accepted "
                                    "them (accepted, rejected)", ["outcome"], registry=r)
        self.token_seconds = Histogram("mesh_router_token_seconds", "Wall time of one output token: select, "
                                       "ask K experts, mix, sample", buckets=STEP_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("mesh_router_time_to_first_token_seconds", "Time from the start "
                                             "of a generation to its first token (prefill)", buckets=STEP_BUCKETS,
                                             registry=r)
        self.expert_calls = Counter("mesh_router_expert_calls", "Step calls to experts, by outcome (ok, late, "
                                    "error:<grpc code>, rejected)", ["outcome"], registry=r)
        self.expert_call_seconds = Histogram("mesh_router_expert_call_seconds", "Latency of Step calls that "
                                             "answered", buckets=STEP_BUCKETS, registry=r)
        self.active = Gauge("mesh_router_active_generations", "Generations streaming now", registry=r)
        self.spot_checks = Counter("mesh_router_spot_checks", "Verdicts of spot checks on experts' replies, by "
                                   "outcome (passed, failed)", ["outcome"], registry=r)
        self.http_requests = Counter("mesh_api_requests", "HTTP API requests, by route and status",
                                     ["route", "status"], registry=r)
        self._state: Collector | None = None
        self._trust: Collector | None = None
        self._credits: Collector | None = None

    def watch_mesh(self, experts: Callable[[], list], halted: Callable[[], bool]) -> None:
        """Report experts (by state, RTT, tokens served) and the halt flag at every scrape."""
        if self._state is not None:
            self.registry.unregister(self._state)
        self._state = _MeshState(experts, halted)
        self.registry.register(self._state)

    def watch_credits(self, rows: Callable[[], list]) -> None:
        """Report the credit ledger (donor, expert, tokens rows) at every scrape."""
        if self._credits is not None:
            self.registry.unregister(self._credits)
        self._credits = _Credits(rows)
        self.registry.register(self._credits)

    def watch_trust(self, rows: Callable[[], list]) -> None:
        """Report each spot-checked expert's trust and quarantine (router.trust rows) at every scrape."""
        if self._trust is not None:
            self.registry.unregister(self._trust)
        self._trust = _Trust(rows)
        self.registry.register(self._trust)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _MeshState(Collector):
    def __init__(self, experts: Callable[[], list], halted: Callable[[], bool]) -> None:
        self.experts = experts
        self.halted = halted

    def collect(self) -> Iterator:
        records = self.experts()
        states = GaugeMetricFamily("mesh_router_experts", "Experts known to the registry, by state", labels=["state"])
        counts: dict[str, int] = {s: 0 for s in ("online", "suspect", "quarantined", "gone")}
        for r in records:
            counts[r.state] = counts.get(r.state, 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        rtt = GaugeMetricFamily("mesh_router_expert_rtt_seconds", "Smoothed Step round-trip time of each expert",
                                labels=["expert_id", "model"])
        served = CounterMetricFamily("mesh_router_expert_tokens_served", "Tokens each expert contributed to",
                                     labels=["expert_id", "model"])
        for r in records:
            if r.state == "gone":
                continue
            if r.rtt_ms is not None:
                rtt.add_metric([r.expert_id, r.model_id], r.rtt_ms / 1000)
            served.add_metric([r.expert_id, r.model_id], r.tokens_served)
        yield rtt
        yield served
        yield GaugeMetricFamily("mesh_router_halted", "1 while the governance kill switch holds the mesh halted",
                                value=1.0 if self.halted() else 0.0)


class _Credits(Collector):
    def __init__(self, rows: Callable[[], list]) -> None:
        self.rows = rows

    def collect(self) -> Iterator:
        credits = CounterMetricFamily("mesh_router_credits", "Credits in the ledger: tokens each expert contributed "
                                      "to mixtures, by donor (none: registered without a key)",
                                      labels=["donor", "expert_id"])
        for r in self.rows():
            credits.add_metric([r.donor[:16] or "none", r.expert_id], r.tokens)
        yield credits


class _Trust(Collector):
    def __init__(self, rows: Callable[[], list]) -> None:
        self.rows = rows

    def collect(self) -> Iterator:
        trust = GaugeMetricFamily("mesh_router_expert_trust", "Spot-check trust of each checked expert (0..1; it "
                                  "scales the mixing weight)", labels=["expert_id"])
        out = GaugeMetricFamily("mesh_router_expert_trust_quarantined", "1 when spot checks put the expert out of "
                                "selection", labels=["expert_id"])
        for r in self.rows():
            trust.add_metric([r.expert_id], r.trust)
            out.add_metric([r.expert_id], 1.0 if r.quarantined else 0.0)
        yield trust
        yield out


_BY_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def router_metrics(registry: object) -> RouterMetrics:
    """The RouterMetrics of the router that owns this expert Registry (made on first use)."""
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = RouterMetrics()
    return metrics
