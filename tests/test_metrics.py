"""Prometheus /metrics on the router's HTTP port and on each expert (--metrics-port), parsed as a scraper would."""

from __future__ import annotations

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from tests.api_helpers import api_mesh, client


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape as {(name, sorted labels): value}, through prometheus_client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_router_and_expert_metrics_scrape_and_count_a_generation(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path, expert_kw={"metrics_port": 0}) as (mesh, api):
        reply = await client(api).chat.completions.create(
            model="mesh", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=6,
            extra_body={"k": 2})
        n = reply.usage.completion_tokens
        async with httpx2.AsyncClient() as http:
            scrape = await http.get(f"{api.origin}/metrics")
            assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
            router = _samples(scrape.text)
            expert_scrapes = [_samples((await http.get(f"http://127.0.0.1:{e.metrics.port}/metrics")).text)
                              for e in mesh.experts]

    finish = reply.choices[0].finish_reason
    reason = "length" if finish == "length" else "eos"
    assert sum(v for (name, labels), v in router.items() if name == "mesh_router_generations_total") == 1
    assert _value(router, "mesh_router_completion_tokens_total") == n
    assert _value(router, "mesh_router_prompt_tokens_total") == reply.usage.prompt_tokens
    assert _value(router, "mesh_router_token_seconds_count") == n
    assert _value(router, "mesh_router_time_to_first_token_seconds_count") == 1
    assert _value(router, "mesh_router_expert_calls_total", outcome="ok") == 2 * n
    assert _value(router, "mesh_router_active_generations") == 0
    assert _value(router, "mesh_router_experts", state="online") == 2
    assert _value(router, "mesh_router_halted") == 0
    assert _value(router, "mesh_api_requests_total", route="/v1/chat/completions", status="200") == 1
    served = [v for (name, _), v in router.items() if name == "mesh_router_expert_tokens_served_total"]
    assert sorted(served) == [n, n]
    assert finish in ("stop", "length")
    assert _value(router, "mesh_router_generations_total", finish_reason=reason) == 1  # counted under its own reason

    for samples in expert_scrapes:
        assert _value(samples, "mesh_expert_requests_total", method="Step") == n
        assert _value(samples, "mesh_expert_step_seconds_count") == n
        assert _value(samples, "mesh_expert_tokens_total") >= reply.usage.prompt_tokens + n - 1
        assert _value(samples, "mesh_expert_distributions_total") == n
        assert _value(samples, "mesh_expert_sessions") in (0, 1)  # the router closes its session at the end
        assert _value(samples, "mesh_expert_session_evictions_total") == 0
        assert not [k for k in samples if k[0] == "mesh_expert_failures_total"]


async def test_refusals_and_failures_are_counted_by_kind(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded], tmp_path) as (mesh, api):
        async with httpx2.AsyncClient(base_url=api.origin) as http:
            big_k = await http.post("/v1/completions", json={"model": "mesh", "prompt": "Hi", "k": 3})
            assert big_k.status_code == 400
            router = _samples((await http.get("/metrics")).text)
    assert _value(router, "mesh_router_generations_refused_total", code="INVALID_ARGUMENT") == 1
    assert _value(router, "mesh_api_requests_total", route="/v1/completions", status="400") == 1
