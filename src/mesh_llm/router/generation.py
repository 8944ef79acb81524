"""A streaming generation: per token select K of N, gather top-k replies, mix, sample, emit."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from mesh_llm.errors import MeshError, StatusError
from mesh_llm.mixing.aggregation import UnknownRule, check_rules, mix
from mesh_llm.mixing.constrain import BadSchema, SchemaConstraint
from mesh_llm.mixing.sampling import Choice, Sampler, SamplingConfig, StopChecker
from mesh_llm.mixing.selection import Candidate, GateContext, UnknownPolicy, get_policy, pick_family
from mesh_llm.models.catalog import UnknownModel
from mesh_llm.pb import expert_pb2, router_pb2
from mesh_llm.router.checkpoints import FINISHED, Checkpoint, CheckpointStore, Snapshot, restore_rngs
from mesh_llm.router.credits import CreditLedger
from mesh_llm.router.detokenize import IncrementalText
from mesh_llm.router.drafting import (
    Draft,
    DraftMismatch,
    DraftModels,
    DraftSpec,
    ModelDrafter,
    NgramDrafter,
    check_gamma,
    parse_draft,
)
from mesh_llm.router.metrics import outcome_kind, router_metrics
from mesh_llm.router.pool import ExpertPool
from mesh_llm.router.posterior import POSTERIOR_POLICIES, PosteriorTracker, mixing_weights
from mesh_llm.router.registry import ONLINE, SUSPECT, ExpertRecord, Registry
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.speculation import GammaController
from mesh_llm.router.steps import CallResult, Halted, Target, call_expert, gather_replies
from mesh_llm.router.tokenizers import TokenizerCache
from mesh_llm.router.trust import spot_check, trust_book

log = logging.getLogger(__name__)
PREFILL_DEADLINE_FACTOR = 3.0
MAX_STEP_DEADLINE_S = 3600.0  # a longer per-token deadline is refused
RANK_SAMPLE = 16  # most experts ranked per token; a larger family is sampled


class GenerationError(StatusError):
    """A generation request that cannot start or go on."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    k: int  # experts mixed per token
    k_explicit: bool  # the request named k (else the router default, which shrinks to fit the mesh)
    extra: int  # stragglers over-selected
    policy: str  # selection policy name
    rule: str  # linear or geometric
    fill: str  # fill rule for ids outside an expert's top-k
    top_k: int  # entries asked of each expert
    deadline_s: float  # per-token deadline
    max_tokens: int  # completion cap before context clipping
    sampling: SamplingConfig  # temperature, top-p, top-k
    seed: int | None  # seeds selection and sampling
    stop: tuple[str, ...]  # stop strings
    trace: bool  # attach per-token traces
    draft: DraftSpec  # drafter of multi-token rounds (kind none: one token per round)
    draft_max: int  # most tokens drafted per round


def plan_from_request(request: router_pb2.GenerateRequest, settings: MeshSettings) -> Plan:
    """Request fields with router defaults filled in; GenerationError on values no generation can use."""
    policy = request.policy or settings.default_policy
    rule = request.mix or settings.default_mix
    fill = request.fill or settings.default_fill
    try:
        get_policy(policy)
        check_rules(rule, fill)
        sampling = SamplingConfig(temperature=request.temperature,
                                  top_p=request.top_p if 0 < request.top_p < 1 else 1.0, top_k=request.sample_top_k)
        draft = parse_draft(request.draft or settings.default_draft)
        draft_max = check_gamma(request.draft_max or settings.default_draft_max)
    except (UnknownPolicy, UnknownRule, ValueError) as exc:
        raise GenerationError("INVALID_ARGUMENT", str(exc)) from None
    top_k = request.top_k or settings.default_top_k
    if not 1 <= top_k <= 4096:
        raise GenerationError("INVALID_ARGUMENT", f"top_k {top_k} is out of range; use 1..4096")
    deadline_s = request.step_deadline_s or settings.step_deadline_s
    if not 0 < deadline_s <= MAX_STEP_DEADLINE_S:  # NaN fails this too
        raise GenerationError("INVALID_ARGUMENT", f"step_deadline_s {deadline_s} is out of range; use a number of "
                              f"seconds in (0, {MAX_STEP_DEADLINE_S:g}], or 0 for the router default")
    if request.HasField("extra"):
        extra = request.extra
    else:  # which K replies arrive first is a race: a seeded (reproducible) request waits for the K it ranked
        extra = 0 if request.HasField("seed") else settings.default_extra
    return Plan(k=request.k or settings.default_k, k_explicit=request.k > 0, extra=extra, policy=policy,
                rule=rule, fill=fill, top_k=top_k, deadline_s=deadline_s,
                max_tokens=request.max_tokens or settings.default_max_tokens, sampling=sampling,
                seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
                trace=request.trace, draft=draft, draft_max=draft_max)


@dataclass(kw_only=True)
class _State:
    context: list[int]  # prompt followed by the completion so far
    completion: list[int] = field(default_factory=list)  # generated ids
    held: dict[str, int] = field(default_factory=dict)  # tokens each expert's session holds
    sent_text: str = ""  # text already streamed
    notes: list[str] = field(default_factory=list)  # degradations to report
    rounds: int = 0  # round trips to the experts so far
    drafted: int = 0  # tokens the drafter proposed
    accepted: int = 0  # drafted tokens the mixture accepted
    logged: list[tuple[int, float, list[str]]] = field(default_factory=list)  # (token, logprob, experts) per token


class Generation:
    """One Generate call: validated at start(), then run() yields GenerateEvents until it finishes."""

    def __init__(self, *, request: router_pb2.GenerateRequest, registry: Registry, pool: ExpertPool,
                 tokenizers: TokenizerCache, settings: MeshSettings, halt: asyncio.Event | None = None,
                 draft_models: DraftModels | None = None, credits: CreditLedger | None = None,
                 checkpoints: CheckpointStore | None = None, resume: Checkpoint | None = None):
        request = resume.request if resume is not None else request
        self.request = request
        self.credits = credits  # credits each mixed expert's donor per token
        self.checkpoints = checkpoints  # where the state is saved every few tokens
        self.resume = resume  # the checkpoint this generation continues from
        self.settings = settings
        self.draft_models = draft_models or DraftModels()
        self.registry = registry
        self.pool = pool
        self.tokenizers = tokenizers
        self.plan = plan_from_request(request, settings)
        self.halt = halt
        self.session_id = resume.generation_id if resume is not None else f"g-{uuid.uuid4().hex}"
        self.policy = get_policy(self.plan.policy, **({"max_rtt_ms": settings.latency_bound_ms}
                                                       if self.plan.policy == "latency" else {}))
        self.rng = np.random.default_rng(self.plan.seed)
        self.sampler = Sampler(self.plan.sampling, seed=self.plan.seed)
        if resume is not None:
            restore_rngs(resume.snapshot, selection=self.rng, sampler=self.sampler.rng)
        self.tracker = (PosteriorTracker(settings.posterior_config(prompt_only=self.plan.policy == "posterior-prompt"))
                        if self.plan.policy in POSTERIOR_POLICIES else None)
        self.metrics = router_metrics(registry)
        self.trust = trust_book(registry)  # spot-check trust per expert: scales weights, quarantines liars
        self.check_rng = np.random.default_rng()  # which rounds are spot-checked (apart from the seeded draws)

    async def start(self) -> None:
        """Pick the tokenizer family, tokenize the prompt and check limits; GenerationError if it cannot run."""
        try:
            await self._start()
        except GenerationError as exc:
            self.metrics.refused.labels(exc.code).inc()
            raise
        self.metrics.prompt_tokens.inc(len(self.prompt_ids))

    async def _start(self) -> None:
        self.allow = set(self.request.expert_ids)
        unknown = self.allow - {r.expert_id for r in self.registry.experts()}
        if unknown:
            raise GenerationError("NOT_FOUND", f"unknown expert id(s) {', '.join(sorted(unknown))}; "
                                  "see `mesh status`")
        candidates = self._allowed(self.registry.candidates())  # online experts whose Info and tokenizer were checked
        if not candidates:
            raise GenerationError("UNAVAILABLE", "no experts online; start one with "
                                  "`mesh-expert serve --join <token>` (the router printed the token)")
        wanted = self.request.model_family or self.settings.family or self.tokenizers.first_family or None
        family = pick_family(candidates, wanted)
        if not family:
            pinned = "" if self.request.model_family else (
                " (the router's family: `mesh router serve --family`, else the first expert checked; name another "
                "with model_family)")
            raise GenerationError("NOT_FOUND", f"no online expert has tokenizer family {wanted}{pinned}; "
                                  "see `mesh status` for the families online")
        self.fingerprint = family[0].tokenizer_fingerprint
        others = len(candidates) - len(family)
        self.notes: list[str] = []
        if others:
            self.notes.append(f"{others} online expert(s) of another tokenizer family not mixed")
        records = [r for r in self.registry.experts() if r.tokenizer_fingerprint == self.fingerprint
                   and r.state in (ONLINE, SUSPECT) and self.registry.checked(r.expert_id)
                   and (not self.allow or r.expert_id in self.allow)]
        # limits come from experts that answered Steps (else from checked Info): a fake cannot set them for all
        trusted = [r for r in records if self.registry.answered(r.expert_id)] or records
        first = self.registry.get(family[0].expert_id)
        try:
            self.tokenizer = await self.tokenizers.get(self.fingerprint, self.pool.stub(first.address))
            self.detokenizer = IncrementalText(self.tokenizer)
        except Exception as exc:
            raise GenerationError("UNAVAILABLE", f"could not get the tokenizer from expert {first.expert_id}: "
                                  f"{exc}") from None
        # the vocabulary size most of them report (the smallest on a tie), never one below the tokenizer's
        sizes = Counter(r.vocab_size for r in trusted if r.vocab_size >= len(self.tokenizer))
        self.vocab_size = min(sizes, key=lambda v: (-sizes[v], v)) if sizes else max(r.vocab_size for r in trusted)
        voters = [r for r in trusted if r.vocab_size == self.vocab_size] or trusted
        votes = Counter(t for r in voters for t in set(r.eos_token_ids))
        self.eos_ids = {t for t, n in votes.items() if 2 * n > len(voters)}  # EOS ids most of them report
        usable = [r for r in records if r.vocab_size == self.vocab_size]
        serving = [r for r in usable if r.max_top_k >= self.plan.top_k]
        if not serving:
            raise GenerationError("INVALID_ARGUMENT", f"top_k {self.plan.top_k} exceeds what these experts "
                                  f"serve ({max(r.max_top_k for r in usable)})")
        self.constraint = None
        if self.request.json_schema:
            try:
                grammar_tokenizer = await asyncio.to_thread(self.tokenizers.grammar.get, self.fingerprint,
                                                            self.tokenizer)
                self.constraint = SchemaConstraint(grammar_tokenizer, self.request.json_schema, self.vocab_size)
            except BadSchema as exc:
                raise GenerationError("INVALID_ARGUMENT", str(exc)) from None
        self.prompt_ids = self._tokenize(self.request.prompt, self.request.chat)
        if not self.prompt_ids:
            raise GenerationError("INVALID_ARGUMENT", "the prompt is empty")
        self._fit(serving, [r for r in serving if r in trusted] or serving, len(records) - len(serving))
        self.drafter = await self._drafter()
        self.gamma = GammaController(self.plan.draft_max) if self.drafter else None

    def _fit(self, serving: list[ExpertRecord], trusted: list[ExpertRecord], left_out: int) -> None:
        """Settle k, the context limit (from trusted) and max_tokens; keep the experts that can serve it all."""
        if self.plan.k > len(serving) and not self.plan.k_explicit:
            self.notes.append(f"default k={self.plan.k} shrunk to the {len(serving)} expert(s) in the mesh")
            self.plan = dataclasses.replace(self.plan, k=len(serving))
        if self.plan.k > len(serving):
            raise GenerationError("INVALID_ARGUMENT", f"k={self.plan.k} but this tokenizer family has only "
                                  f"{len(serving)} expert(s) in the mesh; use --k {len(serving)} or fewer")
        # the k-th largest trusted context limit: k experts can hold the whole generation, one claim clips nothing
        limits = sorted((r.context_limit for r in trusted), reverse=True)
        self.context_limit = limits[min(self.plan.k, len(limits)) - 1]
        if sum(r.context_limit >= self.context_limit for r in serving) < self.plan.k:  # fewer than k trusted
            self.context_limit = sorted((r.context_limit for r in serving), reverse=True)[self.plan.k - 1]
        room = self.context_limit - len(self.prompt_ids)
        if room < 1:
            raise GenerationError("INVALID_ARGUMENT", f"the prompt has {len(self.prompt_ids)} tokens but the "
                                  f"experts' context limit is {self.context_limit}; shorten it")
        self.max_tokens = min(self.plan.max_tokens, room)
        if self.max_tokens < self.plan.max_tokens:
            self.notes.append(f"max_tokens clipped to {self.max_tokens} by the context limit")
        need = len(self.prompt_ids) + self.max_tokens
        self.usable = {r.expert_id for r in serving if r.context_limit >= need}
        left_out += len(serving) - len(self.usable)
        if left_out:
            self.notes.append(f"{left_out} expert(s) of this family left out: their vocabulary, top-k or context "
                              "limit cannot serve this request")

    async def _drafter(self) -> NgramDrafter | ModelDrafter | None:
        spec = self.plan.draft
        if spec.kind == "ngram":
            return NgramDrafter()
        if spec.kind != "model":
            return None
        try:
            model = await self.draft_models.get(spec.model, self.fingerprint)
        except UnknownModel as exc:
            raise GenerationError("INVALID_ARGUMENT", f"draft model: {exc}") from None
        except DraftMismatch as exc:
            raise GenerationError("INVALID_ARGUMENT", str(exc)) from None
        except MeshError as exc:
            raise GenerationError("FAILED_PRECONDITION",
                                  f"draft model {spec.model!r} cannot be loaded: {exc}") from None
        return ModelDrafter(model, self.plan.sampling, seed=self.plan.seed)

    def _tokenize(self, prompt: str, chat: bool) -> list[int]:
        if chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return list(self.tokenizer(prompt).input_ids)

    async def run(self) -> AsyncIterator[router_pb2.GenerateEvent]:
        """Yield one event per token, then a final GenerationDone; closes expert sessions at the end."""
        state = _State(context=list(self.prompt_ids), notes=list(self.notes))
        checker = StopChecker(stop=self.plan.stop, max_tokens=self.max_tokens, eos_ids=self.eos_ids)
        replayed = self._replay(state, checker) if self.resume is not None else []
        checkpointed = len(state.completion)
        began = time.perf_counter()
        first_token_at = None
        reason = None
        metrics = self.metrics
        metrics.active.inc()
        try:
            for event in replayed:
                yield router_pb2.GenerateEvent(token=event)
            while reason is None:
                if self.halt is not None and self.halt.is_set():
                    reason = "halted"
                    break
                round_began = time.perf_counter()
                try:
                    events, reason = await self._round(state, checker)
                except Halted:
                    reason = "halted"
                    break
                except GenerationError as exc:
                    state.notes.append(str(exc))
                    reason = "error"
                    break
                now = time.perf_counter()
                for _ in events:
                    metrics.token_seconds.observe((now - round_began) / len(events))
                if first_token_at is None:
                    first_token_at = now
                    if events and not replayed:
                        events[0].generation_id = self.session_id
                    metrics.first_token_seconds.observe(now - began)
                state.logged.extend((e.token_id, e.logprob, list(e.expert_ids)) for e in events)
                if reason is None and self.checkpoints is not None and self.checkpoints.due(len(state.completion),
                                                                                            checkpointed):
                    await self._checkpoint(state)
                    checkpointed = len(state.completion)
                for event in events:
                    yield router_pb2.GenerateEvent(token=event)
        finally:
            metrics.active.dec()
            metrics.generations.labels(reason or "cancelled").inc()
            metrics.completion_tokens.inc(len(state.completion) - len(replayed))
            metrics.rounds.inc(state.rounds)
            self._settle(reason)
            self._close_sessions(state)
        elapsed = time.perf_counter() - began
        yield router_pb2.GenerateEvent(done=router_pb2.GenerationDone(
            finish_reason=reason, prompt_tokens=len(self.prompt_ids), completion_tokens=len(state.completion),
            tokens_per_second=(len(state.completion) - len(replayed)) / elapsed if elapsed > 0 else 0.0,
            time_to_first_token_s=(first_token_at - began) if first_token_at else 0.0,
            text=checker.text, notes=state.notes, rounds=state.rounds, drafted_tokens=state.drafted,
            accepted_tokens=state.accepted, generation_id=self.session_id))

    def _replay(self, state: _State, checker: StopChecker) -> list[router_pb2.TokenEvent]:
        """Restore the checkpoint's tokens into state and checker; their events, marked replayed."""
        snap = self.resume.snapshot
        events = []
        for token_id, logprob, experts in zip(snap.completion, snap.logprobs, snap.experts):
            if self.constraint is not None:
                self.constraint.consume(token_id)
            event, _ = self._emit(state, checker, Choice(token_id=token_id, logprob=logprob), [], drafted=False)
            event.expert_ids.extend(experts)
            event.replayed = True
            events.append(event)
        state.logged = list(zip(snap.completion, snap.logprobs, snap.experts))
        state.held, state.notes = dict(snap.held), list(snap.notes)
        state.rounds, state.drafted, state.accepted = snap.rounds, snap.drafted, snap.accepted
        if events:
            events[0].generation_id = self.session_id
        return events

    async def _checkpoint(self, state: _State) -> None:
        """Save the state a restarted router needs to go on from here, and the credits earned so far."""
        snapshot = Snapshot(completion=list(state.completion), logprobs=[t[1] for t in state.logged],
                            experts=[t[2] for t in state.logged], held=dict(state.held), rounds=state.rounds,
                            drafted=state.drafted, accepted=state.accepted, notes=list(state.notes),
                            selection_rng=self.rng.bit_generator.state,
                            sampler_rng=self.sampler.rng.bit_generator.state)
        try:
            await asyncio.to_thread(self.checkpoints.save, self.session_id, self._settled_request(), snapshot)
            if self.credits is not None:
                await asyncio.to_thread(self.credits.flush)
        except Exception:  # a store hiccup costs resumability, never the generation
            log.exception("could not checkpoint generation %s", self.session_id)

    def _settled_request(self) -> router_pb2.GenerateRequest:
        """The request with the defaults it ran under filled in, so a router restarted with other ones resumes alike."""
        request = router_pb2.GenerateRequest()
        request.CopyFrom(self.request)
        plan = self.plan
        request.k, request.policy, request.mix, request.fill = plan.k, plan.policy, plan.rule, plan.fill
        request.top_k, request.step_deadline_s, request.extra = plan.top_k, plan.deadline_s, plan.extra
        request.max_tokens, request.model_family = plan.max_tokens, self.fingerprint
        request.draft = f"model:{plan.draft.model}" if plan.draft.kind == "model" else plan.draft.kind
        request.draft_max = plan.draft_max
        return request

    def _settle(self, reason: str | None) -> None:
        """At the end: write the credits earned and mark a finished checkpoint done, in a thread (the store may wait)."""
        if self.credits is not None or self.checkpoints is not None:
            asyncio.get_running_loop().run_in_executor(None, self._record_end, reason)

    def _record_end(self, reason: str | None) -> None:
        try:
            if self.credits is not None:
                self.credits.flush()
            if self.checkpoints is not None and reason in FINISHED:
                self.checkpoints.finish(self.session_id, reason)
        except Exception:
            log.exception("could not record the end of generation %s in the store", self.session_id)

    async def _draft(self, state: _State) -> Draft:
        """The drafted continuation for this round (empty when not drafting or nothing to gain)."""
        room = self.max_tokens - len(state.completion) - 1  # the round adds one token beyond its draft
        if self.drafter is None or not state.held or room < 1:
            return Draft(tokens=[], probs=[])  # the prompt's round only fills the experts' caches
        gamma = min(self.gamma.next(), room)
        if gamma < 1:
            return Draft(tokens=[], probs=[])
        try:
            if isinstance(self.drafter, ModelDrafter):
                return await asyncio.to_thread(self.drafter.propose, state.context, gamma)
            return self.drafter.propose(state.context, gamma)
        except Exception as exc:  # a broken drafter costs speed, never the generation
            self._drop_drafter(state, exc)
            return Draft(tokens=[], probs=[])

    def _drop_drafter(self, state: _State, exc: Exception) -> None:
        log.exception("drafter failed; going on without drafts")
        state.notes.append(f"drafting turned off after an error in the drafter: {exc}")
        self.drafter = None

    def _warm_drafter(self, state: _State) -> asyncio.Task | None:
        """A model drafter's prompt prefill, run beside the experts' own (it would otherwise delay the first draft)."""
        if not isinstance(self.drafter, ModelDrafter):
            return None

        async def warm() -> None:
            try:
                await asyncio.to_thread(self.drafter.warm, list(state.context))
            except Exception as exc:  # a broken drafter costs speed, never the generation
                self._drop_drafter(state, exc)

        return asyncio.create_task(warm())

    async def _round(self, state: _State, checker: StopChecker) -> tuple[list[router_pb2.TokenEvent], str | None]:
        """One round trip: draft, ask the experts to verify every drafted position, accept a prefix plus one token."""
        round_began = time.perf_counter()
        draft = await self._draft(state)
        warming = self._warm_drafter(state) if not state.held else None
        t0 = time.perf_counter()
        ranked = self._rank(state)
        select_s = time.perf_counter() - t0
        prefill = not state.held
        deadline = self.plan.deadline_s * (PREFILL_DEADLINE_FACTOR if prefill else 1.0)
        sent = state.context + draft.tokens
        positions = len(draft.tokens) + 1
        tracker = self.tracker
        # posterior routing asks every candidate on the prompt and now and then after, so all get scored
        ask_all = tracker is not None and (prefill or (not tracker.frozen and
                                                       state.rounds % tracker.config.refresh_every == 0))
        score_upto = len(state.context) if tracker is not None and not tracker.frozen else 0

        async def call(candidate: Candidate, timeout: float) -> CallResult:
            # targets (registry lookup, channel) are built only for the experts actually asked
            return await call_expert(self._target(candidate), session_id=self.session_id, context=sent,
                                     held=state.held.get(candidate.expert_id, 0), top_k=self.plan.top_k,
                                     timeout=timeout, positions=positions, score_upto=score_upto)

        wanted = len(ranked) if ask_all else self.plan.k
        results = await gather_replies(ranked, k=wanted, extra=0 if ask_all else self.plan.extra,
                                       deadline_s=deadline, halt=self.halt, call=call)
        t1 = time.perf_counter()
        if warming is not None:
            await warming
        answered = self._account(results, state, timed_out=sum(r.ok for r in results) < wanted,
                                 deadline_ms=deadline * 1000)
        if tracker is not None:
            for r in answered:
                tracker.record(r.expert_id, r.score_from, r.scores)
            if prefill:
                tracker.freeze_if_prompt_only()
        used, weights = self._choose(answered)
        if used and self.check_rng.random() < self.settings.spot_check:
            used, weights = await self._spot_check(ranked, used, answered, results, state, call)
        if not used:
            outcomes = ", ".join(f"{r.expert_id}: {r.outcome}" for r in results) or "no expert could be asked"
            raise GenerationError("UNAVAILABLE", f"no expert answered token {len(state.completion)} in time "
                                  f"({outcomes})")
        if len(used) < self.plan.k:
            note = f"token {len(state.completion)}: mixed {len(used)} of k={self.plan.k} experts"
            if not any(n.startswith("mixed fewer") for n in state.notes):
                state.notes.append(f"mixed fewer than k={self.plan.k} experts on some tokens (first: {note})")
        base = len(state.context)
        events: list[router_pb2.TokenEvent] = []
        reason = None
        accepted = 0
        for position in range(positions):
            mixed = mix([r.at(position) for r in used], vocab_size=self.vocab_size, weights=weights,
                        rule=self.plan.rule, fill=self.plan.fill)
            try:
                dist = self.constraint.restrict(mixed) if self.constraint is not None else mixed
                if position < len(draft.tokens):
                    ok, choice = self.sampler.verify(dist, draft.tokens[position], draft.probs[position])
                else:
                    ok, choice = False, self.sampler.sample(dist)
                if self.constraint is not None:
                    self.constraint.consume(choice.token_id)
            except MeshError as exc:
                raise GenerationError("INTERNAL", str(exc)) from None
            accepted += ok
            event, reason = self._emit(state, checker, choice, used, drafted=ok)
            event.trace.union_size = len(mixed.ids) if self.plan.trace else 0
            events.append(event)
            if reason is not None or not ok:
                break
        if tracker is not None:
            emitted = [e.token_id for e in events]
            for r in answered:
                tracker.record(r.expert_id, base,
                               [r.at(j).logprob_of(t, self.vocab_size) for j, t in enumerate(emitted)])
        used_ids = {r.expert_id for r in used}
        if self.credits is not None:
            self.credits.earn(used_ids, len(events))
        for r in results:
            if r.ok:
                state.held[r.expert_id] = base + accepted  # rejected draft positions are rolled back next round
                self.registry.record_success(r.expert_id, max(r.latency_ms - r.compute_ms, 0.0),
                                             tokens=len(events) if r.expert_id in used_ids else 0)
        round_s = time.perf_counter() - round_began
        if self.gamma is not None and not prefill:
            self.gamma.observe(drafted=len(draft.tokens), accepted=accepted, round_s=round_s, draft_s=draft.seconds)
        state.rounds += 1
        state.drafted += len(draft.tokens)
        state.accepted += accepted
        self.metrics.draft_tokens.labels("accepted").inc(accepted)
        self.metrics.draft_tokens.labels("rejected").inc(len(draft.tokens) - accepted)
        if self.plan.trace:
            events[0].trace.calls.extend(
                router_pb2.ExpertCall(expert_id=r.expert_id, used=r.expert_id in used_ids, outcome=r.outcome,
                                      latency_ms=r.latency_ms, reply_bytes=r.reply_bytes, compute_ms=r.compute_ms)
                for r in results)
            router_ms = (select_s + time.perf_counter() - t1) * 1000
            for event in events:
                event.trace.router_ms = router_ms / len(events)
                event.trace.positions = positions
                event.trace.draft_ms = draft.seconds * 1000
        return events, reason

    def _emit(self, state: _State, checker: StopChecker, choice, used: list[CallResult], *, drafted: bool
              ) -> tuple[router_pb2.TokenEvent, str | None]:
        """Append a chosen token, check for the end and build its event (text held back near a stop string)."""
        state.context.append(choice.token_id)
        state.completion.append(choice.token_id)
        text = self.detokenizer.update(state.completion)
        reason = checker.update(choice.token_id, text)
        if reason is None and self.constraint is not None and self.constraint.finished:
            reason = "stop"  # the grammar's output is complete
        shown = checker.streamable().rstrip("\ufffd")  # hold back half a multi-byte character
        delta = ""
        if shown.startswith(state.sent_text):
            delta, state.sent_text = shown[len(state.sent_text):], shown
        event = router_pb2.TokenEvent(token_id=choice.token_id, text=delta, logprob=choice.logprob,
                                      expert_ids=[r.expert_id for r in used], round=state.rounds, drafted=drafted)
        return event, reason

    def _allowed(self, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.expert_id in self.allow] if self.allow else candidates

    def _rank(self, state: _State) -> list[Candidate]:
        def of_family(pool: list[Candidate]) -> list[Candidate]:
            return self.trust.annotate([c for c in pool if c.tokenizer_fingerprint == self.fingerprint
                                        and c.expert_id in self.usable])

        # a bounded sample of the family (the experts holding this session first) keeps per-token cost flat in N
        pool = (self._allowed(self.registry.candidates()) if self.allow else
                self.registry.sample_candidates(self.fingerprint, RANK_SAMPLE, keep=state.held))
        family = of_family(pool)
        if len(family) < self.plan.k and len(pool) >= RANK_SAMPLE:  # a sample too thin to serve: rank them all
            family = of_family(self.registry.candidates())
        context = GateContext(position=len(state.completion), recent_tokens=tuple(state.context[-8:]),
                              posterior=self.tracker.posterior() if self.tracker is not None else None)
        return self.policy.select(family, len(family), self.rng, context)

    def _target(self, candidate: Candidate) -> Target:
        record = self.registry.get(candidate.expert_id)
        return Target(expert_id=record.expert_id, stub=self.pool.stub(record.address), vocab_size=record.vocab_size)

    def _weight(self, expert_id: str) -> float:
        return self.registry.get(expert_id).weight * self.trust.trust(expert_id)

    async def _spot_check(self, ranked: list[Candidate], used: list[CallResult], answered: list[CallResult],
                          results: list[CallResult], state: _State, call) -> tuple[list[CallResult], list[float]]:
        """Judge this round's replies against referees of the same model; mix without those that failed."""
        deadline = self.plan.deadline_s * PREFILL_DEADLINE_FACTOR  # a referee may have to read the whole context
        check = await spot_check(used, ranked=ranked, model_of=lambda eid: self.registry.get(eid).model_id,
                                 ask=lambda c: call(c, deadline), vocab_size=self.vocab_size, book=self.trust,
                                 rng=self.check_rng, spare=answered)
        self._account(check.referee_calls, state, timed_out=False, deadline_ms=deadline * 1000)
        results.extend(check.referee_calls)  # their sessions now hold the context like the others'
        for passed, _ in check.judged.values():
            self.metrics.spot_checks.labels("passed" if passed else "failed").inc()
        kept = [r for r in answered + check.referee_calls if r.ok and r.expert_id not in check.failed]
        return self._choose(kept) if kept else self._choose(used)

    def _account(self, results: list[CallResult], state: _State, *, timed_out: bool, deadline_ms: float
                 ) -> list[CallResult]:
        """The good replies in arrival order; failures are recorded (a reply missing the deadline is one)."""
        answered = []
        calls = self.metrics.expert_calls
        for r in results:
            calls.labels(outcome_kind(r.outcome)).inc()
            if r.ok:
                self.metrics.expert_call_seconds.observe(r.latency_ms / 1000)
                answered.append(r)
            elif r.outcome != "late":
                state.held.pop(r.expert_id, None)
                self.registry.record_failure(r.expert_id, r.outcome)
            elif timed_out:  # the round waited the whole deadline for it: a failure that cost the deadline
                self.registry.record_failure(r.expert_id, "late", rtt_ms=deadline_ms)
            else:  # not waited for (K others answered first): no failure, though it may never answer
                self.registry.record_wait(r.expert_id, r.latency_ms)
        return answered

    def _choose(self, answered: list[CallResult]) -> tuple[list[CallResult], list[float]]:
        """The replies to mix (first K to arrive, or the K most probable under the posterior) and their weights."""
        if self.tracker is None:
            used = sorted(answered[: self.plan.k], key=lambda r: r.expert_id)  # arrival order must not change the mix
            return used, [self._weight(r.expert_id) for r in used]
        post = self.tracker.posterior()
        ranked = sorted(answered, key=lambda r: (-post.get(r.expert_id, 0.0), r.expert_id))
        used = sorted(ranked[: self.plan.k], key=lambda r: r.expert_id)
        shares = mixing_weights(post, [r.expert_id for r in used], self.tracker.config.floor)
        return used, [share * self._weight(r.expert_id) for share, r in zip(shares, used)]

    def _close_sessions(self, state: _State) -> None:
        for expert_id in list(state.held):
            try:
                stub = self.pool.stub(self.registry.get(expert_id).address)
            except MeshError:
                continue
            task = asyncio.ensure_future(stub.CloseSession(
                expert_pb2.CloseSessionRequest(session_id=self.session_id), timeout=5))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

