"""One registry row per donor key and name; gone rows hidden after the retention period unless asked for."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from mesh_llm.node import RouterConfig
from mesh_llm.pb import router_pb2
from mesh_llm.router.registry import ExpertSpec, Registry, RegistryConfig
from mesh_llm.store.db import open_engine
from mesh_llm.store.registry_tables import experts
from tests.mesh_helpers import local_mesh

SPEC = ExpertSpec(model_id="tiny", tokenizer_fingerprint="f" * 64, vocab_size=100, context_limit=64)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(experts)).scalar_one()


def test_a_donor_restarting_on_another_port_keeps_its_row_across_router_restarts(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'r.db'}")
    registry = Registry(engine)
    first = registry.register("127.0.0.1:5001", SPEC, name="alice-gpu", identity="id-alice")
    again = registry.register("127.0.0.1:5002", SPEC, name="alice-gpu", identity="id-alice")
    assert again == first and _rows(engine) == 1
    assert registry.get(first).address == "127.0.0.1:5002"
    other = registry.register("127.0.0.1:5003", SPEC, name="alice-gpu", identity="id-bob")
    second_name = registry.register("127.0.0.1:5004", SPEC, name="alice-cpu", identity="id-alice")
    assert len({first, other, second_name}) == 3 and _rows(engine) == 3
    registry.flush()
    restarted = Registry(engine)  # a new router process on the same store
    assert restarted.register("127.0.0.1:5005", SPEC, name="alice-gpu", identity="id-alice") == first
    assert _rows(engine) == 3 and restarted.get(first).address == "127.0.0.1:5005"


def test_another_identity_on_a_gone_address_replaces_the_gone_row(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'r.db'}")
    registry = Registry(engine)
    old = registry.register("127.0.0.1:5001", SPEC, name="a", identity="id-a")
    registry.deregister(old)
    new = registry.register("127.0.0.1:5001", SPEC, name="b", identity="id-b")
    assert new != old and _rows(engine) == 1 and [r.expert_id for r in registry.experts()] == [new]


def test_gone_rows_are_hidden_after_the_retention_period(tmp_path):
    clock = Clock()
    registry = Registry(open_engine(f"sqlite:///{tmp_path / 'r.db'}"), RegistryConfig(gone_retention_s=60),
                        clock=clock)
    gone = registry.register("127.0.0.1:5001", SPEC, name="a", identity="id-a")
    live = registry.register("127.0.0.1:5002", SPEC, name="b", identity="id-b")
    registry.deregister(gone)
    clock.now += 30
    registry.heartbeat(live)
    assert {r.expert_id for r in registry.listed()} == {gone, live}
    clock.now += 31
    registry.heartbeat(live)
    assert [r.expert_id for r in registry.listed()] == [live]
    assert {r.expert_id for r in registry.listed(include_gone=True)} == {gone, live}


async def test_a_restarted_expert_keeps_its_id_and_status_hides_gone_rows(tiny_loaded, tmp_path):
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret",
                          registry=RegistryConfig(gone_retention_s=0.0))
    async with local_mesh([tiny_loaded], tmp_path, config, name="donor-1") as mesh:
        first = mesh.experts.pop()
        first_id = first.link.expert_id
        await first.stop(0)  # deregisters: gone at once, and past the zero retention
        await asyncio.sleep(0.05)
        shown = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=5)
        assert shown.experts == []
        every = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest(all=True), timeout=5)
        assert [(e.expert_id, e.state) for e in every.experts] == [(first_id, "gone")]
        restarted = await mesh.add_expert(tiny_loaded, name="donor-1")  # same MESH_HOME key, new port
        assert restarted.link.expert_id == first_id
        listed = await mesh.stub.ListExperts(router_pb2.ListExpertsRequest(all=True), timeout=5)
        assert [(e.expert_id, e.state, e.address) for e in listed.experts] == [(first_id, "online", restarted.address)]
