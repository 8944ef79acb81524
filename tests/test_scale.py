"""Per-token registry work is bounded: a sample of the family, not a scan of every registered expert."""

from __future__ import annotations

import pytest

from mesh_llm.router import registry as registry_module
from mesh_llm.router.registry import ExpertSpec, Registry
from mesh_llm.store.db import open_engine

SPEC = ExpertSpec(model_id="tiny", tokenizer_fingerprint="fp-a", vocab_size=512, context_limit=256)
OTHER = ExpertSpec(model_id="tiny", tokenizer_fingerprint="fp-b", vocab_size=512, context_limit=256)


class Clock:
    """A hand-moved clock in unix seconds."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(tmp_path, clock) -> Registry:
    return Registry(open_engine(f"sqlite:///{tmp_path / 'mesh.db'}"), clock=clock)


def register(registry: Registry, n: int, spec: ExpertSpec = SPEC, start: int = 0) -> list[str]:
    return [registry.register(f"127.0.0.1:{20000 + i}", spec, name=f"e{i}") for i in range(start, start + n)]


def test_small_family_is_returned_whole(registry):
    ids = register(registry, 10)
    register(registry, 3, OTHER, start=10)
    whole = [c.expert_id for c in registry.sample_candidates("fp-a", 64)]
    assert sorted(whole) == sorted(ids)
    assert [c.expert_id for c in registry.sample_candidates("fp-a", 64)] == whole  # in one order every time


def test_experts_of_weight_zero_are_never_sampled(registry):
    ids = register(registry, 100)
    for eid in ids[:90]:
        registry.set_weight(eid, 0.0)
    assert {c.expert_id for c in registry.sample_candidates("fp-a", 16)} == set(ids[90:])
    registry.set_weight(ids[0], 0.5)
    assert ids[0] in {c.expert_id for c in registry.sample_candidates("fp-a", 16)}


def test_large_family_sample_is_bounded_distinct_and_keeps_held_experts(registry):
    ids = register(registry, 200)
    register(registry, 50, OTHER, start=200)
    held = [ids[3], ids[150], "e-unknown"]
    sample = [c.expert_id for c in registry.sample_candidates("fp-a", 64, keep=held)]
    assert len(sample) == 64 and len(set(sample)) == 64
    assert sample[:2] == held[:2]
    assert set(sample) <= set(ids)


def test_sample_leaves_out_gone_and_quarantined_and_takes_back_re_registered(registry, clock):
    ids = register(registry, 100)
    for eid in ids[:60]:
        registry.deregister(eid)
    registry.quarantine(ids[60])
    live = set(ids[61:])
    assert {c.expert_id for c in registry.sample_candidates("fp-a", 64)} == live
    back = registry.register("127.0.0.1:20000", SPEC, name="e0")
    assert back == ids[0]
    seen = set()
    for _ in range(50):
        seen |= {c.expert_id for c in registry.sample_candidates("fp-a", 30)}
    assert seen == live | {back}


def test_silent_experts_leave_the_sample_after_the_sweep(registry, clock):
    ids = register(registry, 100)
    clock.now += registry.config.gone_after_s + 1
    for eid in ids[:80]:
        registry.heartbeat(eid)
    registry.sweep()
    assert {c.expert_id for c in registry.sample_candidates("fp-a", 64)} <= set(ids[:80])
    assert len(registry.sample_candidates("fp-a", 64)) == 64


def test_sample_builds_no_more_candidates_than_its_size(registry, monkeypatch):
    register(registry, 600)
    built = []
    real = registry_module._candidate
    monkeypatch.setattr(registry_module, "_candidate", lambda eid, row: built.append(eid) or real(eid, row))
    registry.sample_candidates("fp-a", 64, keep=[])
    assert 48 <= len(built) <= 64 and len(set(built)) == len(built)  # distinct; a repeated draw only costs one


def test_simulate_scale_writes_the_curve_and_drops_dead_experts(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import simulate_scale

    out = tmp_path / "scale.jsonl"
    assert simulate_scale.main(["--sizes", "10,200", "--tokens", "100", "--out", str(out),
                                "--img-dir", str(tmp_path / "img")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == [10, 200] and rows[0]["ratio_vs_n10"] == 1.0
    assert all(r["dead"] >= 1 and r["unselectable_s_max"] < 5.0 for r in rows)
    assert rows[1]["scan_ms_p50"] > rows[1]["rank_ms_p50"]  # ranking all 200 costs more than the bounded sample
    assert (tmp_path / "img" / "scale.md").read_text().count("\n| ") == 4  # header, rule, two sizes
    assert (tmp_path / "img" / "scale_router_ms.png").stat().st_size > 1000


async def test_a_generation_ranks_a_bounded_sample_per_token_among_many_experts(tiny_loaded, tmp_path, monkeypatch):
    from dataclasses import fields

    from tests.mesh_helpers import local_mesh

    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        registry = mesh.router.registry
        real = registry.get(mesh.router.registry.candidates()[0].expert_id)
        spec = ExpertSpec(**{f.name: getattr(real, f.name) for f in fields(ExpertSpec)})
        for i in range(200):  # registered but weighted out: in the registry, never asked
            registry.set_weight(registry.register(f"127.0.0.1:{30000 + i}", spec, name=f"idle{i}",
                                                  identity=f"idle-{i}"), 0.0)
        built = []
        real_candidate = registry_module._candidate
        monkeypatch.setattr(registry_module, "_candidate", lambda eid, row: built.append(eid) or real_candidate(eid, row))
        tokens, done = await mesh.generate(prompt="hello", max_tokens=8, k=1, temperature=0.0)
    assert len(tokens) == 8 and done.finish_reason == "length"
    assert len(built) < 201 + 16 * 9  # one full listing when the generation starts, then a bounded sample per token
