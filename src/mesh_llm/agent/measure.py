"""Metrics a proposal claims to improve, measured before it is submitted and after it is applied."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_llm.agent.sandbox import Sandbox
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import RouterUnavailable, router_status, stream_generate

log = logging.getLogger(__name__)

PROBE_PROMPT = "The capital of France is"
NLL_KINDS = frozenset({"set_expert_weight"})  # judged on probe NLL (lower is better)
THROUGHPUT_KINDS = frozenset({"set_default_k", "set_selection_policy", "set_step_deadline", "quarantine_expert"})


@dataclass(frozen=True, kw_only=True)
class Tolerances:
    nll: float = 0.01  # nats/token the probe NLL may rise after applying before it counts as a regression
    throughput: float = 0.5  # fraction of probe tokens/s that may be lost before it counts as a regression


def metric_for(kind: str) -> str | None:
    """The metric a proposal of this kind is judged on, or None when it changes nothing measurable."""
    if kind in NLL_KINDS:
        return "probe_nll"
    if kind in THROUGHPUT_KINDS:
        return "probe_tokens_per_second"
    return None


async def probe_throughput(router: str, expert_ids: Sequence[str], *, tokens: int = 16,
                           timeout_s: float = 120) -> dict:
    """One short greedy generation through the router with its defaults (k, policy, deadline), limited to expert_ids."""
    request = router_pb2.GenerateRequest(prompt=PROBE_PROMPT, max_tokens=tokens, temperature=0.0, seed=0,
                                         expert_ids=list(expert_ids))
    began = time.perf_counter()
    done = None
    try:
        async for event in stream_generate(router, request, timeout=timeout_s):
            if event.HasField("done"):
                done = event.done
    except RouterUnavailable as exc:  # e.g. none of these experts is online any more
        return {"metric": "probe_tokens_per_second", "value": 0.0, "finish_reason": "error", "notes": [str(exc)]}
    wall = time.perf_counter() - began
    if done is None:
        return {"metric": "probe_tokens_per_second", "value": 0.0, "finish_reason": "error", "notes": ["no summary"]}
    value = done.completion_tokens / wall if wall > 0 and done.finish_reason != "error" else 0.0
    return {"metric": "probe_tokens_per_second", "value": value, "finish_reason": done.finish_reason,
            "tokens": done.completion_tokens, "notes": list(done.notes)[:3]}


async def probe_nll(router: str, sandbox: Sandbox, expert_ids: Sequence[str]) -> dict:
    """Probe-text NLL under the router's current weights and mix rule, on the experts' recorded replies."""
    status = await router_status(router)
    scope = set(expert_ids)
    experts = [e for e in status.experts if e.expert_id in scope and e.state != "gone"]
    families = {}
    for e in experts:
        families.setdefault(e.tokenizer_fingerprint, []).append(e)
    group = max(families.values(), key=len) if families else []
    if not group:
        return {"metric": "probe_nll", "value": math.inf, "error": "no expert of the subset is registered"}
    replies = await sandbox.replies(group)
    weights = {e.expert_id: e.weight for e in group}
    return {"metric": "probe_nll", "value": sandbox.nll(replies, weights, status.default_mix),
            "weights": weights}


async def measure(metric: str, *, router: str, sandbox: Sandbox, expert_ids: Sequence[str],
                  probe_tokens: int = 16) -> dict:
    """Measure one metric now."""
    if metric == "probe_nll":
        return await probe_nll(router, sandbox, expert_ids)
    return await probe_throughput(router, expert_ids, tokens=probe_tokens)


def regression(baseline: dict, after: dict, tol: Tolerances) -> str | None:
    """Why `after` is a regression against `baseline`, or None when it is not."""
    metric = baseline.get("metric")
    if metric == "probe_nll":
        if after["value"] > baseline["value"] + tol.nll:
            return f"probe NLL rose from {baseline['value']:.4f} to {after['value']:.4f} nats/token"
        return None
    if after.get("finish_reason") == "error" and baseline.get("finish_reason") != "error":
        return f"the probe generation now fails ({'; '.join(after.get('notes', [])) or 'error'})"
    if after["value"] < baseline["value"] * (1 - tol.throughput):
        return (f"probe throughput fell from {baseline['value']:.2f} to {after['value']:.2f} tokens/s "
                f"(more than {tol.throughput:.0%})")
    return None
