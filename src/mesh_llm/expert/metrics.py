"""Prometheus metrics of one expert, and the small HTTP server that exposes them (`--metrics-port`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mesh_llm.errors import MeshError

disable_created_metrics()  # no *_created series: they double every counter for nothing

log = logging.getLogger(__name__)

# a decode step of a small model on a CPU is tens of milliseconds; a long prefill takes seconds
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("Info", "Step", "Rollback", "CloseSession", "GetTokenizer")


class ExpertMetrics:
    """An expert's counters, step histogram and session gauge on a registry of their own."""

    def __init__(self, sessions: Callable[[], int], evictions: Callable[[], int] = lambda: 0) -> None:
        """Create every metric; `sessions` and `evictions` are read from the session table when scraped."""
        r = self.registry = CollectorRegistry()
        requests = Counter("mesh_expert_requests", "RPCs received, by method", ["method"], registry=r)
        self.requests = {m: requests.labels(m) for m in METHODS}  # children bound once: the hot path only incs
        self.failures = Counter("mesh_expert_failures", "RPCs that failed, by gRPC status", ["code"], registry=r)
        self.step_seconds = Histogram("mesh_expert_step_seconds", "Model compute of one Step (prefill or decode)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.tokens = Counter("mesh_expert_tokens", "Tokens appended to sessions by Step calls", registry=r)
        self.distributions = Counter("mesh_expert_distributions", "Top-k distributions returned", registry=r)
        self.batch_size = Histogram("mesh_expert_batch_size", "Step calls run in one batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.sessions = Gauge("mesh_expert_sessions", "Generation sessions held (KV caches)", registry=r)
        self.sessions.set_function(sessions)
        r.register(_Evictions(evictions))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _Evictions(Collector):
    def __init__(self, evictions: Callable[[], int]) -> None:
        self.evictions = evictions

    def collect(self):
        yield CounterMetricFamily("mesh_expert_session_evictions", "Sessions evicted to stay within the KV-cache "
                                  "bounds", value=self.evictions())


@dataclass(kw_only=True)
class MetricsServer:
    httpd: object  # wsgiref server of prometheus_client
    thread: threading.Thread  # its serving thread
    port: int  # port bound

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(metrics: ExpertMetrics, host: str, port: int) -> MetricsServer:
    """Serve /metrics of these metrics on host:port (0 picks a free port) in a background thread."""
    try:
        httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise MeshError(f"could not serve metrics on {host}:{port} ({exc}); pick another --metrics-port") from None
    bound = httpd.server_port
    log.info("expert metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(httpd=httpd, thread=thread, port=bound)
