"""Useful proposals only: a schema-valid no-op is refused before governance; `mesh agent run --once` shows its
stages, prints the proposal and its tier, fails with a failed task and keeps its own deadline."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from mesh_llm.agent import usefulness
from mesh_llm.agent.observe import from_status, render
from mesh_llm.agent.progress import Progress, TextProgress
from mesh_llm.cli import main
from mesh_llm.pb import router_pb2
from mesh_llm.testing.agent import signed_vote
from tests.test_agent_loop import _run, agent_mesh, long_tiny  # noqa: F401  (fixture)

PROMPT_LINE = "- e-aaa (fast) online, rtt 41.2 ms, 0 failures, 9.5 tok/s, weight 1, 120 tokens served"


def _snapshot():
    status = router_pb2.RouterStatus(default_k=2, default_policy="random", default_mix="linear", phase=2, experts=[
        router_pb2.ExpertStatus(expert_id="e-aaa", name="fast", state="online", rtt_ms=41.2, tokens_per_second=9.5,
                                weight=1.0, tokens_served=120),
        router_pb2.ExpertStatus(expert_id="e-bbb", name="slow", state="online", rtt_ms=380.7, failures=2,
                                tokens_per_second=1.5, weight=1.0, tokens_served=80)])
    return from_status(status, subset=None, audit_rows=[], finished=[], taken_at=0.0)


def _note(text: str, rationale: str) -> dict:
    return {"kind": "note", "target": "mesh", "params": {"text": text}, "rationale": rationale}


@pytest.mark.parametrize("proposal, problem", [
    (_note("1", "e-bbb has rtt 380.7 ms"), "fewer than 3 different words"),
    (_note("nice_nice_nice_nice_nice", "e-bbb has rtt 380.7 ms"), "fewer than 3 different words"),
    (_note("look into the slow expert", "looks fine"), "cites no observed metric"),
    (_note("look into the slow expert", "an rtt of 12.5 ms is high"), "cites no observed metric"),  # never observed
    (_note("look into the slow expert", "mode K/ 01 o= ex89i 1 ,ne"), "cites no observed metric"),  # random text
    (_note("look into the slow expert", PROMPT_LINE), "copied from the prompt"),
    (_note(PROMPT_LINE, "e-bbb rtt 380.7 ms"), "parameter text is copied from the prompt"),
    ({"kind": "set_default_k", "target": "router", "params": {"k": 2}, "rationale": "k 2 with rtt 41.2 ms"},
     "changes nothing (k is 2 already)"),
    ({"kind": "set_expert_weight", "target": "e-aaa", "params": {"weight": 1.0}, "rationale": "e-aaa is fast"},
     "e-aaa has weight 1 already"),
])
def test_schema_valid_no_ops_are_named(proposal, problem):
    prompt = f"Cluster state:\n{PROMPT_LINE}\nTask (config_tuning): tune it"
    found = usefulness.problems(proposal, prompt=prompt, snap=_snapshot(), free_text=("text",))
    assert any(problem in p for p in found), found


def test_citable_facts_are_what_was_observed_and_each_counts_as_a_citation():
    snap = _snapshot()
    facts = usefulness.citable_facts(snap, ["e-bbb"])
    assert facts[:2] == ["p50 rtt 211.0 ms", "p90 rtt 346.8 ms"] and "e-bbb rtt 380.7 ms" in facts
    assert "e-bbb 2 failures" in facts and not any("e-aaa" in f for f in facts)  # only the experts asked for
    assert not any("tokens/s in the last minute" in f for f in facts)  # 0.00 tells nothing, so it is left out
    for fact in facts:
        proposal = _note("move load away from the slow expert", f"{fact}: it is the slowest of the two")
        assert usefulness.problems(proposal, prompt="", snap=snap, free_text=("text",)) == [], fact


def test_facts_of_a_busy_large_mesh_cover_every_expert_and_are_not_taken_for_copies():
    experts = [router_pb2.ExpertStatus(expert_id=f"e-{i:03d}", state="online", rtt_ms=20.0 + i, tokens_per_second=9.5,
                                       weight=1.0, tokens_served=100 + i) for i in range(12)]
    snap = from_status(router_pb2.RouterStatus(default_k=2, default_policy="random", phase=2, experts=experts,
                                               recent_tokens_per_second=12.34),
                       subset=None, audit_rows=[], finished=[], taken_at=0.0)
    facts = usefulness.citable_facts(snap, [e.expert_id for e in experts])
    assert len(facts) == 40 and all(f"e-{i:03d} rtt {20.0 + i:.1f} ms" in facts for i in range(12))
    prompt = f"Cluster state:\n{render(snap)}\nTask (config_tuning): tune it"
    for fact in facts:
        proposal = _note("move load away from the slow expert", f"{fact}: too low here")  # as short a reason as allowed
        assert usefulness.problems(proposal, prompt=prompt, snap=snap, free_text=("text",)) == [], fact


@pytest.mark.parametrize("proposal", [
    _note("move load away from the slow expert", "e-bbb rtt 380.7 ms against 41.2 ms for e-aaa"),
    _note("check the network path to slow", "e-bbb has 2 failures and the slowest round trip"),
    {"kind": "set_expert_weight", "target": "e-bbb", "params": {"weight": 0.5}, "rationale": "rtt 381 ms, slowest"},
])
def test_a_proposal_that_changes_something_and_cites_what_was_seen_is_useful(proposal):
    prompt = f"Cluster state:\n{PROMPT_LINE}\nTask (config_tuning): tune it"
    assert usefulness.problems(proposal, prompt=prompt, snap=_snapshot(), free_text=("text",)) == []


async def test_a_no_op_never_reaches_governance_and_a_useful_note_does(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path, reject_noop=True, rationale_max=160) as (mesh, gov, store, agent):
        empty = json.dumps(_note("1", "1"))
        refused = await _run(store, agent, "test_generation", ["note"], output=empty)
        assert refused.state == "refused" and refused.proposal_id is None and gov.proposals() == []
        assert "no-op proposal refused before governance" in refused.error and "3 different words" in refused.error
        assert refused.tier == "suggest" and refused.proposal["params"] == {"text": "1"}
        expert = mesh.experts[0].link.expert_id
        useful = json.dumps(_note("look at the expert with the most failures", f"{expert} is online, 0 failures"))
        kept = await _run(store, agent, "test_generation", ["note"], output=useful)
        assert kept.state == "awaiting_review" and kept.tier == "suggest", kept.error
        assert [p.id for p in gov.proposals()] == [kept.proposal_id]


def test_text_progress_counts_tokens_on_one_terminal_line():
    class Tty:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

        def isatty(self):
            return True

    out = Tty()
    progress = TextProgress(out)
    progress.stage(4, "observe", "2 of 2 experts online")
    for n in range(1, 4):
        progress.tokens(4, n)
    progress.stage(4, "gate", "proposal note mesh")
    assert out.text == ("task #4 observe: 2 of 2 experts online\n\rtask #4 generate: 1 tokens\rtask #4 generate: "
                        "2 tokens\rtask #4 generate: 3 tokens\ntask #4 gate: proposal note mesh\n")


async def test_agent_run_once_shows_stages_prints_the_proposal_and_fails_with_its_task(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path, phase=2, delay_ms=30) as (mesh, _gov, store, _agent):
        common = ["agent", "run", "--once", "--router", mesh.router.address, "--db", f"sqlite:///{tmp_path / 'router.db'}",
                  "--governance", str(tmp_path / "gov")]
        result = await asyncio.to_thread(CliRunner().invoke, main.app, common)
        task = store.get(1)
        refused = task.state == "refused"  # random text may make a no-op; otherwise it waits for governance
        assert refused or task.state.startswith("awaiting_"), task.error
        assert result.exit_code == int(refused), result.output
        lead = task.proposal["rationale"].split(" ")[0]  # a generated rationale begins with an observed fact
        assert lead in {e.link.expert_id for e in mesh.experts} | {"p50", "p90"} or lead.replace(".", "").isdigit()
        for stage in ("task #1 observe: 2 of 2 experts online", "task #1 generate: asking 2 of 2 experts",
                      f"task #1 generate: {len(task.raw_output) and ''}", "task #1 gate: proposal "):
            assert stage in result.stderr, result.stderr
        assert "task #1 generate: 32 tokens" in result.stderr  # the counter, off a terminal every 32 tokens
        assert f"{task.tier:<13} {task.proposal['kind']} {task.proposal['target']}" in result.stdout
        assert f"rationale: {task.proposal['rationale']}" in result.stdout
        assert ("failed or were refused" in result.stderr) == refused

        late = await asyncio.to_thread(CliRunner().invoke, main.app, [*common, "--deadline", "0.5"])
        assert late.exit_code == 1, late.output
        task = store.get(2)
        assert task.state == "failed" and "deadline of 0.5 s (--deadline)" in task.error
        assert "error: the task passed its deadline" in late.stdout and "failed or were refused" in late.stderr
        for option in ("--deadline", "--resume-wait"):
            refused = await asyncio.to_thread(CliRunner().invoke, main.app, [*common, option, "soon"])
            assert f"{option} 'soon'" in refused.output and refused.exit_code == 2


class _Stages(Progress):
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def stage(self, task_id: int, stage: str, text: str) -> None:
        self.seen.append((stage, text))


async def test_a_useful_change_goes_through_every_stage(long_tiny, tmp_path):  # noqa: F811
    async with agent_mesh(long_tiny, tmp_path, reject_noop=True, rationale_max=160) as (mesh, gov, store, agent):
        agent.progress = stages = _Stages()
        expert = mesh.experts[0].link.expert_id
        output = json.dumps({"kind": "set_default_k", "target": "router", "params": {"k": 1},
                             "rationale": f"one expert is enough: {expert} is online with 0 failures"})
        task = await _run(store, agent, "scheduler_optimization", ["set_default_k"], output=output)
        assert task.state == "awaiting_votes", task.error
        for member in ("alice", "bob"):
            mesh.router.governance.vote(signed_vote(member, task.proposal_id))
        assert (await agent.follow_up(store.get(task.id))).state == "applied"
        names = [name for name, _ in stages.seen]
        assert names == ["observe", "gate", "measure", "gate", "gate", "apply", "measure"], stages.seen
        assert stages.seen[1][1].startswith("proposal set_default_k router")
        assert "tier deploy_minor" in stages.seen[3][1] and stages.seen[4][1].startswith("awaiting_votes")
        assert stages.seen[6][1].startswith(f"proposal {task.proposal_id} applied; probe_tokens_per_second")
