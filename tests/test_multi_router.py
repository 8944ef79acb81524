"""Routers sharing one store see the same experts: registered at one, selectable and used at another."""

from __future__ import annotations

import pytest

from mesh_llm.router.registry import GONE, ONLINE, AddressTaken, Registry
from mesh_llm.store.db import open_engine
from tests.router_processes import router_processes
from tests.test_scale import SPEC, Clock


def test_an_expert_registered_at_one_router_is_selectable_at_another_until_it_goes(store_url):
    clock = Clock()
    a, b = Registry(open_engine(store_url), clock=clock), Registry(open_engine(store_url), clock=clock)
    eid = a.register("127.0.0.1:7001", SPEC, name="donor", identity="id-1")
    assert b.candidates() == []
    b.sweep()
    assert [c.expert_id for c in b.candidates()] == [eid]
    assert [c.expert_id for c in b.sample_candidates("fp-a", 16)] == [eid]
    assert b.get(eid).address == "127.0.0.1:7001"
    with pytest.raises(AddressTaken):  # bound to its registrant's key at B as well
        b.register("127.0.0.1:7001", SPEC, name="thief", identity="id-2")
    for _ in range(10):  # heartbeats handled by A keep it alive for B
        clock.now += 1.0
        assert a.heartbeat(eid)
        a.sweep()
        b.sweep()
        assert b.get(eid).state == ONLINE
    b.record_success(eid, rtt_ms=12.0)
    b.sweep()
    assert a.get(eid).rtt_ms is None  # B's own measurements stay with B
    clock.now += a.config.suspect_after_missed * a.config.heartbeat_interval_s + 0.5
    b.sweep()
    assert b.candidates() == []  # silent at A: out of B's selection as soon as A would suspect it
    assert a.heartbeat(eid)
    a.sweep()
    b.sweep()
    assert [c.expert_id for c in b.candidates()] == [eid]
    a.deregister(eid, "leaving")
    b.sweep()
    assert b.get(eid).state == GONE and b.candidates() == []


def test_an_expert_registering_again_at_the_second_router_is_its_own_there(store_url):
    clock = Clock()
    a, b = Registry(open_engine(store_url), clock=clock), Registry(open_engine(store_url), clock=clock)
    eid = a.register("127.0.0.1:7001", SPEC, name="donor", identity="id-1")
    b.sweep()
    assert b.register("127.0.0.1:7001", SPEC, name="donor", identity="id-1") == eid
    clock.now += 1.0
    assert b.heartbeat(eid)
    b.sweep()
    assert Registry(open_engine(store_url), clock=clock).get(eid).last_seen == clock.now


async def test_a_generation_through_one_router_process_uses_an_expert_registered_at_another(
        store_url, mesh_home, tiny_loaded):
    from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
    from mesh_llm.grpc_util import channel
    from mesh_llm.models.loading import LoadOptions
    from mesh_llm.pb import router_pb2, router_pb2_grpc
    from tests.test_resume import _online
    from tests.test_router_governance import _stream

    async with router_processes(2, store_url, mesh_home) as (addresses, invites):
        joined, secret = resolve_join(None, invites[0])
        expert = await start_expert(ExpertConfig(load=LoadOptions(model=tiny_loaded.model_id), port=0,
                                                 measure_speed=False, router=joined, secret=secret), tiny_loaded)
        try:
            await _online(addresses[0], 1)
            await _online(addresses[1], 1, timeout=5)
            async with channel(addresses[1]) as b:
                stub = router_pb2_grpc.RouterStub(b)
                status = await stub.GetRouterStatus(router_pb2.RouterStatusRequest())
                tokens, done, _ = await _stream(stub, k=1, max_tokens=6, temperature=0.0)
        finally:
            await expert.stop(0)
    assert [e.address for e in status.experts] == [f"127.0.0.1:{expert.port}"]
    assert tokens == 6 and done.finish_reason == "length", done
