"""The store on SQLite and PostgreSQL alike: migrations, registry, governance, agent tasks and the dialect layer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, delete, inspect, select, text

from mesh_llm.agent.tasks import TaskStore
from mesh_llm.governance.core import Governance
from mesh_llm.governance.policy import load_policy
from mesh_llm.pb import router_pb2
from mesh_llm.router.checkpoints import CheckpointStore, ResumeRefused, Snapshot
from mesh_llm.router.credits import CreditLedger
from mesh_llm.router.registry import ExpertSpec, Registry
from mesh_llm.store import dialect
from mesh_llm.store.db import STORE_ENV, StoreUnavailable, default_db_url, open_engine
from mesh_llm.store.migrate import current_version, discover, schema_version, upgrade
from mesh_llm.testing.governance import make_signers

POLICY = load_policy(Path(__file__).resolve().parents[1] / "governance" / "policy.toml")
SPEC = ExpertSpec(model_id="tiny", tokenizer_fingerprint="fp-a", vocab_size=512, context_limit=256,
                  tokens_per_second=40.0, eos_token_ids=(2, 7))


def test_every_migration_applies_once(store_url):
    engine = open_engine(store_url)
    newest = max(m.version for m in discover())
    assert current_version(engine) == newest
    assert upgrade(engine) == newest  # a second start changes nothing
    tables = set(inspect(engine).get_table_names())
    assert {"experts", "gov_audit", "agent_tasks", "schema_version"} <= tables
    engine.dispose()


def test_a_migration_numbered_below_the_newest_is_still_applied(store_url):
    engine = open_engine(store_url)
    with engine.begin() as conn:  # as if v006 had landed after v007 was applied
        conn.execute(delete(schema_version).where(schema_version.c.version == 6))
        conn.execute(text("DROP TABLE credit_ledger"))
        conn.execute(text("DROP TABLE credit_donors"))
    assert upgrade(engine) == max(m.version for m in discover())
    assert {"credit_ledger", "credit_donors"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_registry_survives_reopening(store_url):
    registry = Registry(open_engine(store_url))
    eid = registry.register("127.0.0.1:5001", SPEC, name="donor")
    registry.record_success(eid, 12.0, tokens=5)
    registry.record_failure(eid, "error:" + "x" * 400)  # longer than the column: must not break a strict server
    registry.flush()
    registry.engine.dispose()
    again = Registry(open_engine(store_url))
    record = again.get(eid)
    assert (record.name, record.tokens_served, record.eos_token_ids) == ("donor", 5, (2, 7))
    again.engine.dispose()


def test_governance_halt_and_audit_chain(store_url, tmp_path):
    signers = make_signers(["alice", "bob", "carol"])
    gov = Governance(engine=open_engine(store_url), policy=POLICY, members=signers.members())
    gov.halt(signers.halt("alice", "store test"))
    gov.engine.dispose()
    reopened = Governance(engine=open_engine(store_url), policy=POLICY, members=signers.members())
    assert reopened.switch.is_halted and reopened.switch.reason == "store test"
    result = reopened.verify_audit()
    assert result.ok and result.checked >= 1
    reopened.engine.dispose()


def test_two_processes_writing_governance_keep_one_audit_chain(store_url):
    signers = make_signers(["alice", "bob", "carol"])
    govs = [Governance(engine=open_engine(store_url), policy=POLICY, members=signers.members()) for _ in range(2)]
    proposal = {"kind": "note", "target": "router", "params": {"text": "x"}, "rationale": "r"}

    def submit_many(gov: Governance) -> None:
        for _ in range(15):
            gov.submit(proposal, author="alice")

    threads = [threading.Thread(target=submit_many, args=(g,)) for g in govs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    result = govs[0].verify_audit()
    assert result.ok and result.checked == 30 and len(govs[1].proposals()) == 30
    for g in govs:
        g.engine.dispose()


def test_credit_ledger_adds_up_across_flushes_and_reopening(store_url):
    ledger = CreditLedger(open_engine(store_url))
    ledger.bind("e-1", "donor-a")
    ledger.earn(["e-1", "e-2"], 3)
    assert ledger.flush() == 6
    ledger.earn(["e-1"], 4)
    ledger.flush()
    ledger.engine.dispose()
    again = CreditLedger(open_engine(store_url))
    again.earn(["e-1"], 1)  # the donor binding came back from the store
    assert [(r.donor, r.expert_id, r.tokens) for r in again.rows()] == [("donor-a", "e-1", 8), ("", "e-2", 3)]
    assert again.balance("donor-a") == 8 and again.balance("") == 0
    again.engine.dispose()


def test_checkpoints_overwrite_load_and_finish(store_url):
    store = CheckpointStore(open_engine(store_url), every=4)
    request = router_pb2.GenerateRequest(prompt="hi", k=2, seed=5)
    rng = np.random.default_rng(5)
    rng.random(3)
    for n in (4, 8):
        store.save("g-1", request, Snapshot(completion=list(range(n)), logprobs=[-1.0] * n, experts=[["e-1"]] * n,
                                            held={"e-1": n - 1}, rounds=n, drafted=0, accepted=0,
                                            selection_rng=rng.bit_generator.state))
    loaded = store.load("g-1")
    assert loaded.request == request and loaded.snapshot.completion == list(range(8))
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.snapshot.selection_rng  # 128-bit state survives the store
    assert restored.random() == rng.random()
    store.finish("g-1", "length")
    with pytest.raises(ResumeRefused, match="already finished"):
        store.load("g-1")
    store.engine.dispose()


def test_agent_tasks_get_ids_in_order(store_url):
    store = TaskStore(open_engine(store_url))
    first = store.submit({"type": "config_tuning", "context": "a"}, source="test")
    second = store.submit({"type": "config_tuning", "context": "b"}, source="test")
    assert second.id == first.id + 1
    store.engine.dispose()


_meta = MetaData()
_counts = Table("t_counts", _meta, Column("name", String(20), primary_key=True), Column("n", Integer, nullable=False),
                Column("label", String(20), nullable=False))


def test_upsert_sets_or_adds_and_insert_ignore_keeps_the_first(store_url):
    engine = open_engine(store_url)
    _meta.create_all(engine)
    with engine.begin() as conn:
        dialect.upsert(conn, _counts, {"name": "a", "n": 2, "label": "one"}, ["name"], add=["n"])
        dialect.upsert(conn, _counts, {"name": "a", "n": 3, "label": "two"}, ["name"], add=["n"])
        assert dialect.insert_ignore(conn, _counts, {"name": "b", "n": 1, "label": "first"}, ["name"])
        assert not dialect.insert_ignore(conn, _counts, {"name": "b", "n": 9, "label": "second"}, ["name"])
        rows = dict((r.name, (r.n, r.label)) for r in conn.execute(select(_counts)))
    assert rows == {"a": (5, "two"), "b": (1, "first")}
    engine.dispose()


def test_write_lock_serialises_two_writers(store_url):
    engine = open_engine(store_url)
    _meta.create_all(engine)
    order: list[str] = []
    holding = threading.Event()

    def second_writer() -> None:
        holding.wait(5)
        with engine.begin() as conn:
            dialect.lock_for_writing(conn, "counts")
            order.append("second")

    thread = threading.Thread(target=second_writer)
    thread.start()
    with engine.begin() as conn:
        dialect.lock_for_writing(conn, "counts")
        holding.set()
        time.sleep(0.3)  # the other writer must still be waiting for the lock
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    engine.dispose()


def test_postgres_urls_use_psycopg_and_other_databases_are_refused():
    assert dialect.driver_url("postgresql://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert dialect.driver_url("postgres://u@h/d").startswith("postgresql+psycopg://")
    with pytest.raises(dialect.UnsupportedStore, match="names mysql; use sqlite:///PATH or postgresql://"):
        dialect.driver_url("mysql://u@h/d")


def test_unreachable_server_says_what_to_do():
    with pytest.raises(StoreUnavailable, match="start the database server or pass another --db"):
        open_engine("postgresql://nobody:x@127.0.0.1:1/none")


def test_mesh_store_sets_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, "postgresql://u@h/d")
    assert default_db_url() == "postgresql://u@h/d"
    monkeypatch.delenv(STORE_ENV)
    assert default_db_url().startswith("sqlite:///") and default_db_url().endswith("mesh.db")


async def _eventually(predicate, timeout: float = 3.0) -> float:
    began = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - began < timeout, "not reached in time"
        await asyncio.sleep(0.02)
    return time.perf_counter() - began


async def test_an_action_applied_through_one_router_changes_the_settings_of_another(store_url, tmp_path):
    from mesh_llm.grpc_util import channel
    from mesh_llm.node import RouterConfig, start_router
    from mesh_llm.pb import governance_pb2_grpc
    from tests.test_router_governance import _approve, _gov_dir, _halt

    config = RouterConfig(port=0, db_url=store_url, secret="s3cret", governance_dir=_gov_dir(tmp_path, phase=2),
                          governance_poll_s=0.05)
    first, second = await start_router(config), await start_router(config)
    try:
        before = second.service.settings.default_k
        async with channel(first.address) as ch:
            gov = governance_pb2_grpc.GovernanceStub(ch)
            assert (await _approve(gov, "set_default_k", "router", {"k": before + 1})).status == "applied"
            assert first.service.settings.default_k == before + 1
            took = await _eventually(lambda: second.service.settings.default_k == before + 1)
            await gov.HaltMesh(_halt("carol", "undo it"))  # the halt reverts the action on every router
        await _eventually(lambda: first.service.settings.default_k == second.service.settings.default_k == before)
    finally:
        await first.stop(0)
        await second.stop(0)
    assert took < 1.0


async def test_two_router_processes_on_one_store_share_halts_and_settings(store_url, tmp_path, mesh_home,
                                                                          tiny_loaded):
    from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
    from mesh_llm.grpc_util import channel
    from mesh_llm.models.loading import LoadOptions
    from mesh_llm.pb import governance_pb2_grpc, router_pb2, router_pb2_grpc
    from tests.test_resume import _free_port, _online
    from tests.test_router_governance import _approve, _gov_dir, _halt, _stream

    gov_dir = _gov_dir(tmp_path, phase=2)
    routers, addresses, invites = [], [], []
    expert = None
    try:
        for _ in range(2):
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", str(port),
                                     "--db", store_url, "--governance", str(gov_dir)],
                                    env=dict(os.environ, MESH_HOME=str(mesh_home)), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            routers.append(proc)
            addresses.append(f"127.0.0.1:{port}")
            line = ""
            while not line.startswith("invite token: "):
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
                assert line, "a router exited before printing its invite token"
            invites.append(line.split()[-1])
        joined, secret = resolve_join(None, invites[0])
        expert = await start_expert(ExpertConfig(load=LoadOptions(model=tiny_loaded.model_id), port=0,
                                                 measure_speed=False, router=joined, secret=secret, delay_ms=20),
                                    tiny_loaded)
        await _online(addresses[0], 1)
        async with channel(addresses[0]) as a, channel(addresses[1]) as b:
            gov_a, gov_b = governance_pb2_grpc.GovernanceStub(a), governance_pb2_grpc.GovernanceStub(b)
            status_b = router_pb2_grpc.RouterStub(b).GetRouterStatus
            k = (await status_b(router_pb2.RouterStatusRequest())).default_k
            assert (await _approve(gov_a, "set_default_k", "router", {"k": k + 1})).status == "applied"
            for _ in range(50):  # within a second
                if (await status_b(router_pb2.RouterStatusRequest())).default_k == k + 1:
                    break
                await asyncio.sleep(0.02)
            assert (await status_b(router_pb2.RouterStatusRequest())).default_k == k + 1
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(router_pb2_grpc.RouterStub(a), started, k=1, max_tokens=200))
            await asyncio.wait_for(started.wait(), 20)
            sent = time.perf_counter()
            await gov_b.HaltMesh(_halt("carol", "halt at router B"))
            tokens, done, end = await asyncio.wait_for(stream, 5)
        assert done.finish_reason == "halted" and 0 < tokens < 200 and end - sent < 1.0
    finally:
        for proc in routers:
            proc.kill()
            proc.wait(10)
        if expert is not None:
            await expert.stop(0)
