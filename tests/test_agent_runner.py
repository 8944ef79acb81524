"""`mesh agent run` behaviour through a real router: halts stop it at once, subsets run concurrently, restarts recover."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mesh_llm.agent.runner import Runner, RunnerConfig
from mesh_llm.errors import MeshError
from mesh_llm.testing.agent import signed_halt
from tests.test_agent_loop import agent_mesh, long_tiny  # noqa: F401


def _runner(agent, gov, store, **kw) -> Runner:
    return Runner(RunnerConfig(agent=agent.config, poll_s=0.05, halt_poll_s=0.05, **kw), gov=gov, store=store,
                  agent=agent)


def _rows(gov, event: str) -> list[dict]:
    return [dict(json.loads(r.detail), ts=r.ts, seq=r.seq) for r in gov.audit_rows() if r.event == event]


async def test_a_halt_mid_task_stops_the_runner_and_nothing_is_submitted_after_it(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path, delay_ms=40) as (mesh, gov, store, agent):
        queued = store.submit({"type": "test_generation", "kinds": ["note"]}, source="test")
        runner = _runner(agent, gov, store, once=True)
        running = asyncio.create_task(runner.run())
        for _ in range(400):  # wait until the mesh is generating this task's tokens
            if mesh.router.service.active and store.get(queued.id).prompt:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert store.get(queued.id).state == "running"
        halted_at = time.perf_counter()
        mesh.router.governance.halt(signed_halt("alice", "runaway agent"))
        report = await asyncio.wait_for(running, 5)
        stopped_after = time.perf_counter() - halted_at
        assert report.halted and report.halt_reason == "runaway agent"
        print(f"agent stopped {stopped_after * 1000:.0f} ms after the halt")
        assert stopped_after < 1.0, stopped_after
        task = store.get(queued.id)
        assert task.state == "interrupted" and task.proposal_id is None and "halted" in task.error
        assert gov.proposals() == []  # nothing was submitted after the halt
        halt_seq = _rows(gov, "halt")[0]["seq"]
        assert [r["task_id"] for r in _rows(gov, "agent_task_interrupted") if r["seq"] > halt_seq] == [task.id]
        assert not _rows(gov, "proposal_submitted")
        with pytest.raises(MeshError, match="halted"):
            await _runner(agent, gov, store, once=True).run()  # a halted mesh does not start the agent


async def test_subsets_are_disjoint_run_concurrently_and_degrade_without_stealing(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path, experts=4, delay_ms=15) as (mesh, gov, store, agent):
        experts = sorted(e.link.expert_id for e in mesh.experts)
        report = await _runner(agent, gov, store, once=True, subsets=2, follow_up=False).run()
        assert len(report.started) == 2 and not report.halted
        tasks = [store.get(i) for i in report.started]
        assert sorted(t.subset for t in tasks) == [0, 1]
        groups = [set(t.expert_ids) for t in tasks]
        assert not groups[0] & groups[1] and groups[0] | groups[1] == set(experts)
        assert all(len(g) == 2 for g in groups) and all(t.proposal_id for t in tasks)
        started = {r["task_id"]: r["ts"] for r in _rows(gov, "agent_task_started")}
        generated = {r["task_id"]: r["ts"] for r in _rows(gov, "agent_generated")}
        first, second = sorted(report.started, key=started.get)
        assert started[second] < generated[first], "the second subset's task began before the first finished"
        assert {t.type for t in tasks} == {"scheduler_optimization", "security_log_analysis"}  # rotation

        # three experts leave selection: a fresh split gives subset 0 one expert (k=1) and pauses subset 1
        for expert in experts[1:]:
            mesh.router.registry.quarantine(expert, reason="test")
        report = await _runner(agent, gov, store, once=True, subsets=2, follow_up=False).run()
        [task] = [store.get(i) for i in report.started]
        assert task.subset == 0 and task.expert_ids == (experts[0],)
        assert _rows(gov, "agent_subset_paused")[-1]["subset"] == 1
        assert _rows(gov, "agent_subset_degraded")[-1]["k"] == 1


async def test_a_restarted_runner_requeues_tasks_left_running(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path) as (mesh, gov, store, agent):
        orphan = store.create("security_log_analysis", kinds=("observe",), source="test")
        store.claim(orphan.id, subset=0, expert_ids=())  # its runner died here
        report = await _runner(agent, gov, store, once=True).run()
        assert report.requeued == [orphan.id] and report.started == [orphan.id]
        task = store.get(orphan.id)
        assert task.state == "reported" and task.attempts == 2
        events = [r.event for r in gov.audit_rows() if r.actor == "agent"
                  and json.loads(r.detail).get("task_id") == orphan.id]
        assert events[:4] == ["agent_task_queued", "agent_task_started", "agent_task_interrupted",
                              "agent_task_requeued"]
        assert events[-1] == "agent_reported" and events.count("agent_task_started") == 2
