"""One agent task: observe, prompt, generate through the router, parse, submit, gate by tier, measure.

Every step is written to the audit log (actor "agent") in the same transaction as the task's
state change. Nothing skips its tier: read_only proposals are stored as reports, suggest waits for
review, sandbox_test is validated in the sandbox (and still needs a member's spot-check), deploy
tiers wait for votes. The router applies approved proposals through its registered handlers;
the agent only measures afterwards and reports regressions (the tier's rollback rule decides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from mesh_llm.agent import observe, usefulness
from mesh_llm.agent import schema as schema_mod
from mesh_llm.agent.family import Families, Family
from mesh_llm.agent.measure import Tolerances, measure, metric_for, regression
from mesh_llm.agent.progress import Progress
from mesh_llm.agent.prompt import build_prompt
from mesh_llm.agent.sandbox import PROBE_TEXT, Sandbox
from mesh_llm.agent.subsets import SubsetView
from mesh_llm.agent.tasks import (
    APPLIED,
    AWAITING_REVIEW,
    AWAITING_VOTES,
    DONE,
    FAILED,
    INTERRUPTED,
    REFUSED,
    REJECTED,
    REPORTED,
    REVERTED,
    RUNNING,
    SANDBOX_FAILED,
    SANDBOX_PASSED,
    WAITING,
    TaskRecord,
    TaskStore,
)
from mesh_llm.errors import MeshError
from mesh_llm.governance import phases
from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import GovernanceError, KeyStoreError, MeshHalted, Unreachable
from mesh_llm.governance.ops import proposal_message, submit_proposal
from mesh_llm.governance.tiers import ProposalIn, Tier
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import DEFAULT_ROUTER, RouterUnavailable, RouterUnreachable, router_status, stream_generate

log = logging.getLogger(__name__)

RESUME_POLL_S = 0.5  # seconds between asking whether a lost router is back
PROMPT_BUDGETS = (1.0, 0.5, 0.25, 0.1)  # fractions of the prompt budget tried until the prompt fits


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    router: str = DEFAULT_ROUTER  # host:port of the router every generation and proposal goes through
    key: str = "agent"  # key under MESH_HOME/keys that signs proposals (members.toml lists it, role proposer)
    k: int = 2  # experts mixed per token for a task (fewer when its subset has fewer online)
    temperature: float = 0.3  # sampling temperature of task generations (seeded per task)
    rationale_max: int = 160  # longest rationale a proposal may carry (characters)
    text_max: int = 200  # longest free-text parameter (note text, observe what)
    prompt_budget_chars: int = 3000  # characters of prompt before it is shrunk to fit the context limit
    chat: bool = True  # wrap the prompt in the model's chat template
    probe_text: str = PROBE_TEXT  # text the sandbox and the NLL metric score
    probe_top_k: int = 64  # entries per expert reply in the sandbox
    probe_tokens: int = 16  # tokens of the throughput probe generation
    sandbox_tolerance: float = 0.01  # nats/token a proposal may cost in the sandbox and still pass
    tolerances: Tolerances = field(default_factory=Tolerances)  # what counts as a regression after applying
    deadline_s: float = 900.0  # longest one task may run, generation included (`mesh agent run --deadline`)
    reject_noop: bool = True  # refuse proposals that change nothing or cite no observed metric (usefulness.py)
    resume_wait_s: float = 120.0  # how long a generation whose router went away waits for it to come back (0 = fail)
    resume_tries: int = 3  # router losses one generation survives by resuming from its last checkpoint


class _Stop(Exception):
    """Ends a task early in a given state with a reason (internal)."""

    def __init__(self, state: str, reason: str, event: str, **fields):
        super().__init__(reason)
        self.state, self.reason, self.event, self.fields = state, reason, event, fields


class Agent:
    """Runs and follows up agent tasks against one router and one governance store."""

    def __init__(self, *, config: AgentConfig, gov: Governance, store: TaskStore,
                 families: Families | None = None, sandbox: Sandbox | None = None,
                 progress: Progress | None = None) -> None:
        """Generate through config.router; submit to gov; keep tasks in store; report stages to progress."""
        self.config = config
        self.progress = progress or Progress()
        self.gov = gov
        self.store = store
        self.families = families or Families()
        self.sandbox = sandbox or Sandbox(self.families, probe_text=config.probe_text, top_k=config.probe_top_k,
                                          tolerance=config.sandbox_tolerance)
        self._partial: dict[int, str] = {}  # task id -> text generated so far

    # running a task ------------------------------------------------------------------------------

    async def run_task(self, task: TaskRecord, subset: SubsetView | None = None, *,
                       output: str | None = None) -> TaskRecord:
        """Run a claimed (running) task to a waiting or final state; cancelled = interrupted.

        With `output`, that text is taken as the mesh's answer instead of generating one (replaying
        a recorded output, or testing the gates); it is validated exactly like generated text.
        """
        deadline = asyncio.timeout(self.config.deadline_s)
        try:
            async with deadline:
                return await self._run(task, subset, output)
        except TimeoutError as exc:
            if not deadline.expired():
                return self._finish(task.id, FAILED, "agent_task_failed", f"TimeoutError: {exc}")
            return self._finish(task.id, FAILED, "agent_task_failed", f"the task passed its deadline of "
                                f"{self.config.deadline_s:g} s (--deadline)", raw_output=self._partial.get(task.id, ""))
        except asyncio.CancelledError:
            self.interrupt(task.id, "cancelled while running: the mesh was halted or the agent stopped")
            raise
        except _Stop as stop:
            return self._finish(task.id, stop.state, stop.event, stop.reason, **stop.fields)
        except Exception as exc:
            log.exception("agent task %d failed", task.id)
            return self._finish(task.id, FAILED, "agent_task_failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._partial.pop(task.id, None)

    def interrupt(self, task_id: int, reason: str) -> TaskRecord | None:
        """Mark a running task interrupted, keeping the text generated so far."""
        fields = {"raw_output": self._partial[task_id]} if task_id in self._partial else {}
        return self.store.update(task_id, event="agent_task_interrupted", from_states={RUNNING}, state=INTERRUPTED,
                                 error=reason, **fields)

    def _finish(self, task_id: int, state: str, event: str, reason: str, **fields) -> TaskRecord:
        task = self.store.update(task_id, event=event, from_states={RUNNING}, state=state, error=reason[:4000],
                                 **fields)
        return task or self.store.get(task_id)

    def _check_halt(self) -> None:
        self.gov.refresh()  # halts made by any process are in the store
        if self.gov.switch.is_halted:
            raise _Stop(INTERRUPTED, f"the mesh was halted ({self.gov.switch.reason}); nothing more is submitted",
                        "agent_task_interrupted")

    async def _run(self, task: TaskRecord, subset: SubsetView | None, output: str | None) -> TaskRecord:
        self._check_halt()
        snap = await observe.take(self.config.router, self.gov, self.store,
                                  subset=subset.online if subset is not None else None)
        self.store.step(task.id, "agent_observed", snap.summary())
        self.progress.stage(task.id, "observe", f"{len(snap.online())} of {len(snap.experts)} experts online, phase "
                            f"{snap.phase}, {snap.recent_tokens_per_second:.2f} tokens/s over the last minute")
        status = await router_status(self.config.router)
        scope = self._scope(status, subset)
        proposal_schema = self.schema_for(task, [e.expert_id for e in scope], snap)
        family = await self.families.get(scope[0].tokenizer_fingerprint, [e.address for e in scope])
        prompt, max_tokens = self._fit(task, snap, proposal_schema, family)
        task = self.store.update(task.id, event="agent_prompted", prompt=prompt,
                                 expert_ids=tuple(e.expert_id for e in scope),
                                 detail={"kinds": list(proposal_schema.kinds), "max_tokens": max_tokens,
                                         "expert_ids": [e.expert_id for e in scope]})
        if output is None:
            raw = await self._generate(task, prompt, proposal_schema, scope, max_tokens)
        else:
            raw = output
            self.store.update(task.id, event="agent_generated", raw_output=raw, detail={"source": "given"})
        return await self._after_generation(task, proposal_schema, raw, status, scope, snap)

    async def _after_generation(self, task: TaskRecord, proposal_schema, raw: str, status, scope: list,
                                snap: observe.Snapshot) -> TaskRecord:
        self._check_halt()
        proposal = self._validate(proposal_schema, raw, await router_status(self.config.router))
        self.progress.stage(task.id, "gate", f"proposal {proposal['kind']} {proposal['target']} "
                            f"{json.dumps(proposal['params'])}: {proposal['rationale']}")
        self._check_useful(proposal, proposal_schema, task.prompt, snap)
        metric = metric_for(proposal["kind"])
        baseline = {}
        if metric:
            baseline = await measure(metric, router=self.config.router, sandbox=self.sandbox,
                                     expert_ids=[e.expert_id for e in scope], probe_tokens=self.config.probe_tokens)
            self.store.step(task.id, "agent_baseline", baseline)
            self.progress.stage(task.id, "measure", f"baseline {metric} {baseline.get('value', 0):.4g}")
        self._check_halt()
        try:  # signed with the agent's key and sent through the router: the author is that key's name
            view = await submit_proposal(self.config.router, proposal_message(self.config.key, proposal))
        except KeyStoreError as exc:
            raise _Stop(FAILED, f"cannot sign the proposal: {exc}", "agent_task_failed") from None
        except Unreachable as exc:
            raise _Stop(FAILED, str(exc), "agent_task_failed") from None
        except MeshHalted as exc:
            raise _Stop(INTERRUPTED, f"governance refused: {exc}", "agent_task_interrupted") from None
        except GovernanceError as exc:
            raise _Stop(REFUSED, f"governance refused the proposal: {exc}", "agent_refused") from None
        task = self.store.update(task.id, event="agent_proposal_submitted", proposal=proposal, tier=view.tier,
                                 proposal_id=view.id, baseline=baseline, detail={"status": view.status})
        self.progress.stage(task.id, "gate", f"governance proposal #{view.id}: tier {view.tier}, {view.status}")
        task = await self._gate(task, view, status, scope)
        self.progress.stage(task.id, "gate", f"{task.state}: {task.outcome}")
        return task

    def _check_useful(self, proposal: dict, proposal_schema, prompt: str, snap: observe.Snapshot) -> None:
        """Refuse (as _Stop) a schema-valid proposal that is a no-op, before governance sees it."""
        if not self.config.reject_noop:
            return
        found = usefulness.problems(proposal, prompt=prompt, snap=snap,
                                    free_text=usefulness.free_text_params(proposal_schema, proposal["kind"]))
        if found:
            tier, _ = self.gov.registry.classify(ProposalIn.model_validate(proposal))
            raise _Stop(REFUSED, f"no-op proposal refused before governance: {'; '.join(found)}", "agent_refused",
                        proposal=proposal, tier=tier.value)

    def _scope(self, status: router_pb2.RouterStatus, subset: SubsetView | None) -> list:
        allowed = set(subset.online) if subset is not None else None
        online = [e for e in status.experts if e.state == "online" and (allowed is None or e.expert_id in allowed)]
        if not online:
            raise _Stop(FAILED, "no online expert to ask (the subset is paused); start experts or wait",
                        "agent_task_failed")
        families = Counter(e.tokenizer_fingerprint for e in online)
        main = families.most_common(1)[0][0]
        return sorted((e for e in online if e.tokenizer_fingerprint == main), key=lambda e: e.expert_id)

    def schema_for(self, task: TaskRecord, expert_ids: list[str],
                   snap: observe.Snapshot | None = None) -> schema_mod.ProposalSchema:
        """A task's output schema: kinds its phase allows, targets among expert_ids, rationale led by a fact of snap."""
        facts = usefulness.citable_facts(snap, expert_ids) if snap is not None else ()
        return schema_mod.build(self._specs(task), experts=expert_ids, rationale_max=self.config.rationale_max,
                                text_max=self.config.text_max, facts=facts)

    def _specs(self, task: TaskRecord) -> list:
        rule = self.gov.phase()
        specs = []
        for kind in task.kinds:
            spec = self.gov.registry.spec(kind)
            if spec is not None and phases.allows(rule.rule, spec.tier, kind):
                specs.append(spec)
        if not specs:
            raise _Stop(REFUSED, f"phase {rule.phase} allows tiers {[t.value for t in rule.rule.tiers]}; none of "
                        f"this task's kinds ({', '.join(task.kinds)}) is allowed", "agent_refused")
        return specs

    def _fit(self, task: TaskRecord, snap: observe.Snapshot, proposal_schema, family: Family) -> tuple[str, int]:
        """The largest prompt that leaves room for the longest admissible output in the context limit."""
        max_tokens = proposal_schema.max_chars + 8  # every token is at least one character of plain JSON
        context = task.context
        for _ in range(12):
            for fraction in PROMPT_BUDGETS:
                prompt = build_prompt(task.type, snap, proposal_schema, context=context,
                                      budget_chars=int(self.config.prompt_budget_chars * fraction))
                if family.count(prompt, self.config.chat) + max_tokens <= family.context_limit:
                    if context != task.context:
                        self.store.step(task.id, "agent_context_truncated",
                                        {"kept_chars": len(context), "given_chars": len(task.context)})
                    return prompt, max_tokens
            if not context:
                break
            context = context[: len(context) // 2] + " [truncated]" if len(context) > 64 else ""
        raise _Stop(FAILED, f"the prompt does not fit the experts' context limit of {family.context_limit} tokens "
                    f"with room for a {max_tokens}-token proposal", "agent_task_failed")

    async def _generate(self, task: TaskRecord, prompt: str, proposal_schema, scope: list, max_tokens: int) -> str:
        request = router_pb2.GenerateRequest(
            prompt=prompt, chat=self.config.chat, k=min(self.config.k, len(scope)), max_tokens=max_tokens,
            temperature=self.config.temperature, seed=task.id * 7919 + task.attempts,
            json_schema=proposal_schema.text(), expert_ids=[e.expert_id for e in scope],
            model_family=scope[0].tokenizer_fingerprint)
        self.progress.stage(task.id, "generate", f"asking {request.k} of {len(scope)} experts for up to "
                            f"{max_tokens} tokens")
        generation_id, resumes = "", 0
        while True:
            self._partial[task.id], count, done = "", 0, None  # a resumed stream replays the checkpointed tokens
            try:
                async for event in stream_generate(self.config.router, request, timeout=self.config.deadline_s):
                    if event.HasField("token"):
                        generation_id = generation_id or event.token.generation_id
                        self._partial[task.id] += event.token.text
                        count += 1
                        self.progress.tokens(task.id, count)
                    else:
                        done = event.done
                break
            except RouterUnreachable as exc:
                if done is not None:  # the summary arrived before the connection broke: nothing to resume
                    break
                if not generation_id or resumes >= self.config.resume_tries or self.config.resume_wait_s <= 0:
                    raise _Stop(FAILED, f"generation lost: {exc}", "agent_task_failed") from None
                resumes += 1
                request = await self._resume_request(task, generation_id, exc, set(request.expert_ids) or
                                                     {e.expert_id for e in scope})
            except RouterUnavailable as exc:
                halted = "halted" in str(exc)
                raise _Stop(INTERRUPTED if halted else FAILED, f"generation refused: {exc}",
                            "agent_task_interrupted" if halted else "agent_task_failed") from None
        if done is None:
            raise _Stop(FAILED, "the router closed the stream without a summary", "agent_task_failed")
        raw = done.text
        self.store.update(task.id, event="agent_generated", raw_output=raw,
                          detail={"finish_reason": done.finish_reason, "tokens": done.completion_tokens,
                                  "tokens_per_second": round(done.tokens_per_second, 2), "notes": list(done.notes)})
        self.progress.stage(task.id, "generate", f"{done.completion_tokens} tokens, {done.tokens_per_second:.2f} "
                            f"tokens/s, finish {done.finish_reason}")
        if done.finish_reason == "halted":
            raise _Stop(INTERRUPTED, "the mesh was halted during generation", "agent_task_interrupted")
        if done.finish_reason == "error":
            raise _Stop(FAILED, f"generation failed: {'; '.join(done.notes)}", "agent_task_failed")
        return raw

    async def _resume_request(self, task: TaskRecord, generation_id: str, lost: Exception, experts: set[str]
                              ) -> router_pb2.GenerateRequest:
        """Wait for the router and experts to be back; the request continuing generation_id from its checkpoint."""
        self.store.step(task.id, "agent_generation_lost", {"generation_id": generation_id, "error": str(lost)})
        self.progress.stage(task.id, "generate", f"the router went away; waiting up to {self.config.resume_wait_s:g} "
                            f"s to resume generation {generation_id} from its last checkpoint")
        began = time.monotonic()
        while True:
            try:
                status = await router_status(self.config.router, timeout=2.0)
            except RouterUnavailable:
                status = None
            late = time.monotonic() - began >= self.config.resume_wait_s
            online = {e.expert_id for e in status.experts if e.state == "online"} if status is not None else set()
            if status is not None and (experts <= online or late):
                break  # the router is back: with its experts re-registered, or with those that came back in time
            if late:
                raise _Stop(FAILED, f"generation {generation_id} lost: no router answered at {self.config.router} "
                            f"for {self.config.resume_wait_s:g} s", "agent_task_failed")
            await asyncio.sleep(RESUME_POLL_S)
        self.store.step(task.id, "agent_generation_resumed", {"generation_id": generation_id})
        return router_pb2.GenerateRequest(resume_id=generation_id)

    def _validate(self, proposal_schema, raw: str, status: router_pb2.RouterStatus) -> dict:
        """The proposal in raw, checked against the schema, the live registry and governance's bounds."""
        try:
            proposal = schema_mod.check(proposal_schema, raw)
        except schema_mod.OutputProblem as exc:
            if exc.refusal:
                raise _Stop(REFUSED, f"proposal refused: {exc}", "agent_refused") from None
            raise _Stop(FAILED, f"the output is not a proposal: {exc}", "agent_task_failed") from None
        return self.check_proposal(proposal, status)

    def check_proposal(self, proposal: dict, status: router_pb2.RouterStatus) -> dict:
        """Refuse (as _Stop) a proposal naming an unknown expert or leaving its kind's declared bounds."""
        try:
            p = ProposalIn.model_validate(proposal)
        except ValueError as exc:
            raise _Stop(REFUSED, f"proposal refused: {exc}", "agent_refused") from None
        if p.kind in schema_mod.EXPERT_TARGET_KINDS:
            known = {e.expert_id for e in status.experts if e.state != "gone"}
            if p.target not in known:
                raise _Stop(REFUSED, f"proposal refused: {p.kind} names expert {p.target!r}, which the router does "
                            "not know (or is gone)", "agent_refused")
        spec = self.gov.registry.spec(p.kind)
        tier, why = self.gov.registry.classify(p)
        if spec is None or tier != spec.tier:
            raise _Stop(REFUSED, f"proposal refused: {why}", "agent_refused")
        return proposal

    # gates -------------------------------------------------------------------------------------

    async def _gate(self, task: TaskRecord, view, status: router_pb2.RouterStatus, scope: list) -> TaskRecord:
        tier = Tier(view.tier)
        proposal = task.proposal
        if tier == Tier.READ_ONLY:
            outcome = f"report ({view.status}): {proposal['rationale']} {proposal['params']}"
            return self.store.update(task.id, event="agent_reported", state=REPORTED, outcome=outcome)
        if tier == Tier.SUGGEST:
            return self.store.update(task.id, event="agent_awaiting_review", state=AWAITING_REVIEW,
                                     outcome=f"proposal {view.id} waits for a member's review")
        if tier == Tier.SANDBOX_TEST:
            return await self._sandbox(task, view, status, scope)
        return self.store.update(task.id, event="agent_awaiting_votes", state=AWAITING_VOTES,
                                 outcome=f"proposal {view.id} ({tier.value}) waits for {view.required} approval(s)")

    async def _sandbox(self, task: TaskRecord, view, status, scope: list) -> TaskRecord:
        try:
            result = await self.sandbox.simulate(task.proposal, status, [e.expert_id for e in scope])
            passed, detail, numbers = result.passed, result.detail, {"current": result.current,
                                                                     "proposed": result.proposed}
        except MeshError as exc:
            passed, detail, numbers = False, f"sandbox could not simulate it: {exc}", {}
        self._check_halt()
        self.gov.record_sandbox(view.id, passed=passed, detail=detail, actor="agent")
        state = SANDBOX_PASSED if passed else SANDBOX_FAILED
        outcome = detail + ("; waits for a member's spot-check" if passed else "; proposal rejected")
        return self.store.update(task.id, event="agent_sandbox_result", state=state, outcome=outcome,
                                 detail={"passed": passed, **numbers})

    # following up ------------------------------------------------------------------------------

    async def follow_up(self, task: TaskRecord) -> TaskRecord:
        """Move a waiting task on from its proposal's status; after an application, measure and report regressions."""
        if task.state not in WAITING or task.proposal_id is None:
            return task
        view = self.gov.proposal(task.proposal_id)
        waiting = set(WAITING)
        if view.status == "accepted":
            return self.store.update(task.id, event="agent_reviewed", from_states=waiting, state=DONE,
                                     outcome=f"proposal {view.id} accepted by review") or task
        if view.status == "rejected":
            return self.store.update(task.id, event="agent_rejected", from_states=waiting, state=REJECTED,
                                     outcome=f"proposal {view.id} rejected ({view.approvals} for, "
                                             f"{view.rejections} against)") or task
        if view.status == "reverted":
            why = task.baseline.get("regression")
            outcome = f"proposal {view.id} was reverted" + (f" after a regression: {why}" if why else "")
            return self.store.update(task.id, event="agent_reverted", from_states=waiting, state=REVERTED,
                                     outcome=outcome) or task
        if view.status == "failed":
            return self.store.update(task.id, event="agent_task_failed", from_states=waiting, state=FAILED,
                                     error=f"applying proposal {view.id} failed (see the audit log)") or task
        if view.status != "applied":
            return task  # open, approved (timelock) or applying
        self.progress.stage(task.id, "apply", f"the router applied proposal #{view.id}")
        measured = await self._measure_applied(task, view)
        if measured.outcome != task.outcome:
            self.progress.stage(task.id, "measure", measured.outcome)
        return measured

    async def _measure_applied(self, task: TaskRecord, view) -> TaskRecord:
        if "regression" in task.baseline:
            return task  # reported; waiting for the rollback to run
        metric = task.baseline.get("metric")
        if not metric:
            return self.store.update(task.id, event="agent_applied", from_states=set(WAITING), state=APPLIED,
                                     outcome=f"proposal {view.id} applied") or task
        # the task's own experts (its subset): if the change took them all offline, the probe fails: a regression
        after = await measure(metric, router=self.config.router, sandbox=self.sandbox, expert_ids=task.expert_ids,
                              probe_tokens=self.config.probe_tokens)
        why = regression(task.baseline, after, self.config.tolerances)
        numbers = {"metric": metric, "before": task.baseline.get("value"), "after": after.get("value")}
        if why is None:
            return self.store.update(task.id, event="agent_applied", from_states=set(WAITING), state=APPLIED,
                                     baseline={**task.baseline, "after": after}, detail=numbers,
                                     outcome=f"proposal {view.id} applied; {metric} {numbers['before']:.4g} -> "
                                             f"{numbers['after']:.4g}") or task
        reported = self.gov.report_regression(view.id, detail=why, actor="agent")
        automatic = self.gov.policy.tiers[Tier(view.tier)].rollback == "automatic"
        outcome = (f"regression after applying proposal {view.id}: {why}; "
                   + ("automatic rollback requested" if automatic else "reported for manual rollback"))
        # automatic: the task waits until the router has run the inverse (proposal status 'reverted')
        fields = {} if automatic else {"state": APPLIED}
        return self.store.update(task.id, event="agent_regression", from_states=set(WAITING),
                                 baseline={**task.baseline, "after": after, "regression": why}, outcome=outcome,
                                 detail={**numbers, "proposal_status": reported.status}, **fields) or task
