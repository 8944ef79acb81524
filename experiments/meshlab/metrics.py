"""Speed and bandwidth figures of one generation, from its per-token traces and client-side arrival times."""

from __future__ import annotations

import math

import numpy as np

from mesh_llm.pb import expert_pb2
from meshlab.common import mean, pct
from meshlab.lab import GenRecord


def step_request_bytes(top_k: int, position: int = 100) -> int:
    """Serialised size of a one-token decode StepRequest as the router sends it."""
    return expert_pb2.StepRequest(session_id="g-" + "0" * 32, start_position=position, tokens=[12345],
                                  top_k=top_k).ByteSize()


def summarise(record: GenRecord, *, k: int, extra: int, n_experts: int, top_k: int) -> dict:
    """Tokens/s, TTFT, p50/p99 per-token latency, round trips, bytes per expert per token, straggler share."""
    toks = record.tokens
    n = len(toks)
    gaps_ms = [(b.at_s - a.at_s) * 1000 for a, b in zip(toks, toks[1:])]
    decode = toks[1:]  # the first token carries the prompt step
    calls = [c for t in decode for c in t.calls]
    ok = [c for c in calls if c["outcome"] == "ok"]
    late = [c for c in calls if c["outcome"] == "late"]
    failed = [c for c in calls if c["outcome"] not in ("ok", "late")]
    first_wave = min(k + extra, n_experts)
    rounds = [1 if len(t.calls) <= first_wave else 2 for t in decode]
    slowest_used = [max(c["latency_ms"] for c in t.calls if c["used"]) for t in decode if any(c["used"] for c in t.calls)]
    beyond_compute = [g - max(c["compute_ms"] for c in t.calls if c["used"]) for g, t in zip(gaps_ms, decode)
                      if any(c["used"] for c in t.calls) and all("compute_ms" in c for c in t.calls)]
    decode_s = toks[-1].at_s - toks[0].at_s if n > 1 else math.nan
    wire_calls = max(len(calls) + sum(len(t.calls) for t in toks[:1]), 1)
    wire_down = sum(v[1] for v in record.wire_bytes.values())
    wire_up = sum(v[0] for v in record.wire_bytes.values())
    return {
        "tokens": n,
        "finish_reason": record.finish_reason,
        "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else math.nan,
        "tokens_per_s_total": n / record.total_s if record.total_s > 0 else math.nan,
        "ttft_ms": record.ttft_s * 1000,
        "latency_p50_ms": pct(gaps_ms, 50),
        "latency_p99_ms": pct(gaps_ms, 99),
        "latency_mean_ms": mean(gaps_ms),
        "slowest_used_call_p50_ms": pct(slowest_used, 50),
        "beyond_compute_p50_ms": pct(beyond_compute, 50),  # token time minus the slowest used expert's model time
        "router_ms_p50": pct([t.router_ms for t in decode], 50),
        "router_ms_mean": mean([t.router_ms for t in decode]),
        "used_per_token": mean([len(t.expert_ids) for t in decode]),
        "calls_per_token": mean([len(t.calls) for t in decode]),
        "round_trips_per_token": mean(rounds),
        "reply_bytes_per_expert_token": mean([c["reply_bytes"] for c in ok]),
        "request_bytes_per_expert_token": step_request_bytes(top_k),
        "wire_down_bytes_per_call": wire_down / wire_calls if record.wire_bytes else math.nan,
        "wire_up_bytes_per_call": wire_up / wire_calls if record.wire_bytes else math.nan,
        "union_size_mean": mean([t.union_size for t in decode]),
        "straggler_share": len(late) / len(calls) if calls else math.nan,
        "failed_share": len(failed) / len(calls) if calls else math.nan,
        "fewer_than_k_share": mean([len(t.expert_ids) < k for t in decode]),
        "notes": record.notes,
    }


def contributions(record: GenRecord) -> dict[str, int]:
    """How many tokens each expert contributed to."""
    counts: dict[str, int] = {}
    for t in record.tokens:
        for eid in t.expert_ids:
            counts[eid] = counts.get(eid, 0) + 1
    return counts


def latency_ms_array(record: GenRecord) -> np.ndarray:
    """Per-token inter-arrival times in ms (decode tokens only)."""
    return np.diff([t.at_s for t in record.tokens]) * 1000
