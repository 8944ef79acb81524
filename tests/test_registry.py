"""The expert registry: registration, heartbeats and sweeps on a fake clock, failures, persistence."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import event, inspect, select

from mesh_llm.pb import expert_pb2
from mesh_llm.router.registry import ExpertSpec, Registry, UnknownExpert
from mesh_llm.store.db import open_engine
from mesh_llm.store.registry_tables import experts

SPEC = ExpertSpec(model_id="tiny", tokenizer_fingerprint="fp-a", vocab_size=512, context_limit=256,
                  tokens_per_second=40.0, eos_token_ids=(2, 7))


class Clock:
    """A hand-moved clock in unix seconds."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mesh.db'}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(url, clock) -> Registry:  # the default RegistryConfig: the timing tests check the shipped values
    return Registry(open_engine(url), clock=clock)


def online(registry: Registry) -> list[str]:
    return sorted(c.expert_id for c in registry.candidates())


def test_register_and_reregister_same_address(registry):
    eid = registry.register("127.0.0.1:5001", SPEC, name="donor")
    record = registry.get(eid)
    assert record.state == "online" and record.eos_token_ids == (2, 7) and record.tokens_per_second == 40.0
    [cand] = registry.candidates()
    assert cand.expert_id == eid and math.isnan(cand.rtt_ms) and cand.tokenizer_fingerprint == "fp-a"
    again = registry.register("127.0.0.1:5001", ExpertSpec(**{**SPEC.__dict__, "model_id": "tiny-v2"}))
    assert again == eid
    assert registry.get(eid).model_id == "tiny-v2" and registry.get(eid).name == "donor"
    assert registry.register("127.0.0.1:5002", SPEC) != eid
    assert len(registry.experts()) == 2


def test_heartbeats_and_sweep_timings(registry, clock):
    eid = registry.register("127.0.0.1:5001", SPEC)
    assert not registry.heartbeat("e-nobody")
    clock.advance(2.0)
    assert registry.sweep() == []  # two intervals missed is still fine
    clock.advance(0.1)
    assert registry.sweep() == [(eid, "online", "suspect")]
    assert online(registry) == []
    assert registry.heartbeat(eid, active_sessions=3, tokens_per_second=55.0)
    assert online(registry) == [eid] and registry.get(eid).tokens_per_second == 55.0
    clock.advance(4.9)
    registry.sweep()
    assert registry.get(eid).state == "suspect"
    clock.advance(0.2)  # 5.1 s of silence: a dead expert is noticed within 5 s
    assert registry.sweep() == [(eid, "suspect", "gone")]
    assert not registry.heartbeat(eid)  # gone: it must register again
    assert registry.register("127.0.0.1:5001", SPEC) == eid
    assert online(registry) == [eid]


def test_consecutive_failures_make_an_expert_suspect_until_cooldown(registry, clock):
    eid = registry.register("127.0.0.1:5001", SPEC)
    registry.record_failure(eid, "timeout")
    registry.record_success(eid, rtt_ms=10.0)  # a success resets the count
    for _ in range(3):
        registry.record_failure(eid, "rejected:nan")
    assert registry.get(eid).state == "suspect" and registry.get(eid).last_failure == "rejected:nan"
    assert online(registry) == []
    clock.advance(1.0)
    registry.heartbeat(eid)  # alive, but still failing: not yet retried
    assert online(registry) == []
    clock.advance(9.5)
    registry.heartbeat(eid)
    assert online(registry) == [eid]  # cool-down over: one more chance
    registry.record_failure(eid, "timeout")
    assert online(registry) == []


def test_rtt_is_smoothed_and_tokens_counted(registry):
    eid = registry.register("127.0.0.1:5001", SPEC)
    registry.record_success(eid, rtt_ms=10.0, tokens=1)
    registry.record_success(eid, rtt_ms=20.0, tokens=2)
    record = registry.get(eid)
    assert record.rtt_ms == pytest.approx(0.8 * 10.0 + 0.2 * 20.0)
    assert record.tokens_served == 3 and record.failures == 0
    assert registry.candidates()[0].rtt_ms == pytest.approx(12.0)


def test_quarantined_is_never_selected(registry, clock):
    eid = registry.register("127.0.0.1:5001", SPEC)
    other = registry.register("127.0.0.1:5002", SPEC)
    registry.quarantine(eid, "bad answers")
    registry.heartbeat(eid)
    registry.record_success(eid, rtt_ms=1.0)
    registry.register("127.0.0.1:5001", SPEC)  # re-registering does not lift it
    clock.advance(10.0)
    registry.heartbeat(other)
    registry.sweep()  # silence does not turn quarantined into gone either
    assert registry.get(eid).state == "quarantined"
    assert online(registry) == [other]
    registry.unquarantine(eid)
    assert online(registry) == sorted([eid, other])
    registry.set_weight(other, 0.25)
    assert {c.expert_id: c.weight for c in registry.candidates()}[other] == 0.25


def test_bad_ids_and_weights(registry):
    eid = registry.register("127.0.0.1:5001", SPEC)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            registry.set_weight(eid, bad)
    with pytest.raises(UnknownExpert, match="e-missing"):
        registry.record_success("e-missing", rtt_ms=1.0)
    with pytest.raises(UnknownExpert):
        registry.quarantine("e-missing")


def test_state_survives_reopening(url, clock):
    engine = open_engine(url)
    first = Registry(engine, clock=clock)
    a = first.register("127.0.0.1:5001", SPEC, name="alpha")
    b = first.register("127.0.0.1:5002", SPEC)
    first.quarantine(b)
    first.set_weight(a, 2.5)
    first.record_success(a, rtt_ms=30.0, tokens=5)
    first.sweep()
    engine.dispose()

    second = Registry(open_engine(url), clock=clock)
    ra, rb = second.get(a), second.get(b)
    assert (ra.name, ra.weight, ra.tokens_served, ra.rtt_ms) == ("alpha", 2.5, 5, 30.0)
    assert ra.eos_token_ids == (2, 7)
    assert rb.state == "quarantined"
    # not checked since the restart: never selected, and told to register again (so it is checked) on a heartbeat
    assert ra.state == "suspect" and second.candidates() == []
    assert not second.heartbeat(a) and second.candidates() == []
    assert second.register("127.0.0.1:5001", SPEC) == a and [c.expert_id for c in second.candidates()] == [a]
    assert second.register("127.0.0.1:5002", SPEC) == b


def test_per_token_path_does_not_touch_the_database(url, clock):
    engine = open_engine(url)
    registry = Registry(engine, clock=clock)
    eid = registry.register("127.0.0.1:5001", SPEC)
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    for _ in range(100):
        registry.candidates()
        registry.record_success(eid, rtt_ms=5.0)
    registry.record_failure(eid, "timeout")
    assert statements == []
    with engine.connect() as conn:
        assert conn.execute(select(experts.c.tokens_served)).scalar_one() == 0
    assert registry.flush() == 1
    with engine.connect() as conn:
        assert conn.execute(select(experts.c.tokens_served)).scalar_one() == 100


def test_migrated_schema_matches_the_table_definition(url):
    engine = open_engine(url)
    columns = {c["name"]: c for c in inspect(engine).get_columns("experts")}
    assert set(columns) == set(experts.c.keys())
    for column in experts.c:
        assert type(columns[column.name]["type"]).__name__.upper() == column.type.compile(engine.dialect).split("(")[0]
        assert columns[column.name]["nullable"] == column.nullable


def test_spec_and_status_protos(registry):
    info = expert_pb2.ExpertInfo(model_id="m", tokenizer_fingerprint="f", vocab_size=10, context_limit=20,
                                 device="cpu", quantization="nf4", dtype="float32", tokens_per_second=12.5,
                                 max_top_k=64, eos_token_ids=[1], max_sessions=4, expert_version="0.1.0")
    spec = ExpertSpec.from_proto(info)
    assert spec.eos_token_ids == (1,) and spec.quantization == "nf4" and spec.tokens_per_second == 12.5
    status = registry.get(registry.register("127.0.0.1:5001", spec)).to_proto()
    assert (status.state, status.quantization, status.rtt_ms, status.weight) == ("online", "nf4", 0.0, 1.0)
