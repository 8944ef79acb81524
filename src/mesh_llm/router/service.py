"""The Router gRPC servicer: registration, heartbeats, status and streaming generation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_llm.auth import Credentials, bearer_of, expert_token, local_credentials, token_expert
from mesh_llm.errors import MeshError
from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import MeshHalted
from mesh_llm.governance.killswitch import HaltSwitch
from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from mesh_llm.router.checkpoints import Checkpoint, CheckpointStore, ResumeRefused
from mesh_llm.router.credits import Admission, CreditLedger, CreditPolicy
from mesh_llm.router.drafting import DraftModels
from mesh_llm.router.generation import Generation, GenerationError
from mesh_llm.router.metrics import router_metrics
from mesh_llm.router.pool import ExpertPool
from mesh_llm.router.registry import AddressTaken, ExpertSpec, Registry
from mesh_llm.router.scoring import ScoringError, score_request
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.tokenizers import TokenizerCache, TokenizerMismatch
from mesh_llm.router.trust import trust_book

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 3.0  # a registering address must answer Info within this
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
ROUTER_REFUSAL = (("mesh-refused-by", "router"),)  # trailing metadata: the router answered, it did not go away
MAX_PROMPT_CHARS = 1 << 20  # longest prompt a Generate call may send, in characters (RouterService.max_prompt_chars)


class HaltSignal:
    """The governance HaltSwitch seen as the event a Generation waits on: one flag, no copy of it."""

    def __init__(self, switch: HaltSwitch) -> None:
        """Mirror this switch."""
        self.switch = switch

    def is_set(self) -> bool:
        """True while the mesh is halted."""
        return self.switch.is_halted

    async def wait(self) -> bool:
        """Return as soon as the mesh is halted."""
        await self.switch.wait_halted()
        return True


class RouterService(router_pb2_grpc.RouterServicer):
    """Serves the Router service over a registry, an expert pool and mesh settings."""

    def __init__(self, *, registry: Registry, settings: MeshSettings, secret: str, governance: Governance,
                 pool: ExpertPool | None = None, tokenizers: TokenizerCache | None = None,
                 halt_grace_s: float = 0.5, credits: CreditLedger | None = None,
                 checkpoints: CheckpointStore | None = None, credit_policy: CreditPolicy = CreditPolicy(),
                 max_prompt_chars: int = MAX_PROMPT_CHARS):
        """Serve over this registry and settings; governance's halt switch gates every generation."""
        self.registry = registry
        self.settings = settings
        self.secret = secret
        self.governance = governance
        self.halt = HaltSignal(governance.switch)
        self.halt_grace_s = halt_grace_s  # a generation still running this long after a halt is cancelled
        self.pool = pool or ExpertPool()
        self.tokenizers = tokenizers or TokenizerCache()
        self.draft_models = DraftModels()  # draft models loaded in this process, shared by generations
        self.active: set[asyncio.Task] = set()
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) of finished generations
        self._rounds: deque[router_pb2.GenerationDone] = deque(maxlen=64)  # summaries of recent generations
        self.credits = credits  # donors' credits for the tokens their experts contribute
        self.checkpoints = checkpoints  # generation checkpoints, for --resume
        self.admission = Admission(credit_policy)  # who runs when the mesh is busy
        self.running_ids: set[str] = set()  # ids of the generations streaming now
        self.max_prompt_chars = max_prompt_chars  # longer prompts are refused before any expert is asked
        if credits is not None:
            router_metrics(registry).watch_credits(credits.rows)

    def identity(self, expert_key: str) -> str:
        """The registrant identity an expert key stands for (bound to the mesh secret)."""
        return hmac.new(self.secret.encode(), b"expert-key\0" + expert_key.encode(), hashlib.sha256).hexdigest()

    def family(self) -> str:
        """The tokenizer family mixed when a request names none: --family, else the first checked ("" if none yet)."""
        return self.settings.family or self.tokenizers.first_family or ""

    async def RegisterExpert(self, request, context):
        address = request.address.strip()
        if not _is_host_port(address):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"RegisterExpert needs the HOST:PORT the expert serves on, got {request.address!r}")
        identity = self.identity(request.expert_key)
        try:
            self.registry.check_address(address, identity)  # refused before the address is contacted
            key = request.access_key or local_credentials(address).expert_key
            credentials = Credentials(expert_key=key, pin=request.tls_fingerprint)
            spec = await self._checked_spec(address, credentials)
            expert_id = self.registry.register(address, spec, name=request.name, identity=identity)
            if self.credits is not None:
                self.credits.bind(expert_id, identity if request.expert_key else "")
        except AddressTaken as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except _Refused as exc:
            log.warning("registration of %s refused: %s", address, exc)
            await context.abort(exc.code, str(exc))
        await self.pool.forget(address)  # a restarted expert at the same address gets a fresh channel
        self.pool.remember(address, credentials)
        return router_pb2.RegisterExpertReply(expert_id=expert_id, expert_token=expert_token(self.secret, expert_id),
                                              heartbeat_interval_s=self.registry.config.heartbeat_interval_s)

    async def _checked_spec(self, address: str, credentials: Credentials) -> ExpertSpec:
        """The expert's spec from its own Info answer, after its tokenizer files matched its fingerprint."""
        try:
            ch = channel(address, credentials=credentials)
        except MeshError as exc:  # e.g. its TLS certificate is not the one it named
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        async with ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            try:
                info = await stub.Info(expert_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    what = "a router (this one's own address?)" if await _serves_router(ch) else "no Expert service"
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{address} serves {what}: register the address the expert serves on") from None
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{address} did not answer Info ({exc.code().name}: {exc.details()}); register an "
                               "address the router can reach (--advertise HOST:PORT behind NAT)") from None
            if not info.tokenizer_fingerprint or not info.vocab_size or not info.context_limit or not info.max_top_k:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{address} answered Info without a tokenizer fingerprint, vocab_size, context_limit "
                               "or max_top_k")
            try:
                await self.tokenizers.verify(stub, info.tokenizer_fingerprint)
            except TokenizerMismatch as exc:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{address}: {exc}") from None
            except (grpc.aio.AioRpcError, MeshError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"could not check the tokenizer of {address}: {detail}") from None
        return ExpertSpec.from_proto(info)

    async def Heartbeat(self, request, context):
        await self._check_token(request.expert_id, context)
        known = self.registry.heartbeat(request.expert_id, active_sessions=request.active_sessions,
                                        tokens_per_second=request.tokens_per_second)
        return router_pb2.HeartbeatReply(known=known)

    async def Deregister(self, request, context):
        await self._check_token(request.expert_id, context)
        # its channel stays open: Step calls already under way may still finish within the expert's grace period
        return router_pb2.DeregisterReply(known=self.registry.deregister(request.expert_id, reason=request.reason))

    async def _check_token(self, expert_id: str, context) -> None:
        """PERMISSION_DENIED unless the call's expert token (checked by auth.RouterAuth) was issued to expert_id."""
        if token_expert(self.secret, bearer_of(context.invocation_metadata())) != expert_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the expert token of this call was not issued to expert {expert_id}")

    async def ListExperts(self, request, context):
        return router_pb2.ListExpertsReply(experts=self.expert_statuses(request.all))

    def expert_statuses(self, include_gone: bool) -> list[router_pb2.ExpertStatus]:
        """Every listed expert as an ExpertStatus, with its spot-check trust from the trust book."""
        book = trust_book(self.registry)
        statuses = [r.to_proto() for r in self.registry.listed(include_gone)]
        for status in statuses:
            status.trust = book.trust(status.expert_id)
        return statuses

    async def GetRouterStatus(self, request, context):
        s, switch = self.settings, self.governance.switch
        return router_pb2.RouterStatus(
            experts=self.expert_statuses(request.all), default_k=s.default_k,
            default_policy=s.default_policy, default_mix=s.default_mix, halted=switch.is_halted,
            halt_reason=switch.reason, recent_tokens_per_second=self.recent_tokens_per_second(),
            active_generations=len(self.active), phase=self.governance.phase().phase,
            default_draft=s.default_draft, credits=self.donor_credits(), **self.recent_rounds())

    def donor_credits(self) -> list[router_pb2.DonorCredits]:
        """Credits per donor from the ledger, most first (empty without a ledger)."""
        totals: dict[str, int] = {}
        for row in self.credits.rows() if self.credits is not None else []:
            totals[row.donor] = totals.get(row.donor, 0) + row.tokens
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        return [router_pb2.DonorCredits(donor=donor[:16], credits=n) for donor, n in ranked]

    def recent_rounds(self) -> dict[str, float]:
        """Tokens per round trip and the share of drafted tokens accepted, over recent generations."""
        done = list(self._rounds)
        rounds = sum(d.rounds for d in done)
        drafted = sum(d.drafted_tokens for d in done)
        return {"tokens_per_round": sum(d.completion_tokens for d in done) / rounds if rounds else 0.0,
                "draft_acceptance": sum(d.accepted_tokens for d in done) / drafted if drafted else 0.0}

    def recent_tokens_per_second(self, window_s: float = 60.0) -> float:
        """Tokens generated per second over the last window_s seconds."""
        now = time.monotonic()
        tokens = sum(n for t, n in self._recent if now - t <= window_s)
        return tokens / window_s

    async def Generate(self, request, context):
        try:
            self.governance.switch.check()
        except MeshHalted:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the mesh is halted ({self.governance.switch.reason}); "
                                "a quorum of `mesh resume` votes lifts it")
        if oversized := self.oversized(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, oversized)
        credits = self.credits.balance(self.identity(request.donor_key)) if self.credits and request.donor_key else 0
        async with self.admission.slot(credits):
            async for event in self._generate(request, context):
                yield event

    def oversized(self, request: router_pb2.GenerateRequest) -> str:
        """Why a Generate request asks for more than this mesh serves ("" when it does not)."""
        if len(request.prompt) > self.max_prompt_chars:
            return (f"the prompt has {len(request.prompt):,} characters but this router accepts at most "
                    f"{self.max_prompt_chars:,}; send a shorter prompt")
        family = request.model_family or self.family()
        limits = [r.context_limit for r in self.registry.experts()
                  if r.state == "online" and (not family or r.tokenizer_fingerprint == family)]
        if limits and request.max_tokens > max(limits):
            return (f"max_tokens {request.max_tokens} exceeds the experts' context of {max(limits)} tokens (the "
                    f"prompt's tokens included); ask for at most {max(limits)} minus the prompt's length")
        return ""

    async def _generate(self, request, context):
        try:
            resume = self._resumable(request.resume_id) if request.resume_id else None
            generation = Generation(request=request, registry=self.registry, pool=self.pool,
                                    tokenizers=self.tokenizers, settings=self.settings, halt=self.halt,
                                    draft_models=self.draft_models, credits=self.credits,
                                    checkpoints=self.checkpoints, resume=resume)
            await generation.start()
        except (GenerationError, ResumeRefused) as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc), ROUTER_REFUSAL)
        task = asyncio.current_task()
        self.active.add(task)
        self.running_ids.add(generation.session_id)
        tokens = 0
        try:
            async for event in self._halt_bounded(generation.run()):
                tokens += event.HasField("token")
                if event.HasField("done") and event.done.rounds:
                    self._rounds.append(event.done)
                if event.HasField("done") and event.done.finish_reason == "halted":
                    event.done.notes.append(f"the mesh was halted ({self.governance.switch.reason}); a quorum of "
                                            "`mesh resume` votes lifts it")
                yield event
        finally:
            self.active.discard(task)
            self.running_ids.discard(generation.session_id)
            self._recent.append((time.monotonic(), tokens))

    def _resumable(self, generation_id: str) -> Checkpoint:
        """The checkpoint to resume; ResumeRefused when checkpoints are off, it is running or cannot resume."""
        if self.checkpoints is None:
            raise ResumeRefused("FAILED_PRECONDITION", "this router keeps no generation checkpoints; start it with "
                                "`mesh router serve --checkpoint-every N`")
        if generation_id in self.running_ids:
            raise ResumeRefused("ALREADY_EXISTS", f"generation {generation_id} is running on this router now")
        return self.checkpoints.load(generation_id)

    async def Score(self, request, context):
        if self.governance.switch.is_halted:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the mesh is halted ({self.governance.switch.reason}); "
                                "a quorum of `mesh resume` votes lifts it")
        if not request.model_family and self.family():
            request.model_family = self.family()  # the router's family, not the one with most registrations
        try:
            return await score_request(request, registry=self.registry, pool=self.pool, tokenizers=self.tokenizers,
                                       settings=self.settings)
        except ScoringError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc), ROUTER_REFUSAL)

    async def _halt_bounded(self, events: AsyncIterator[router_pb2.GenerateEvent]
                            ) -> AsyncIterator[router_pb2.GenerateEvent]:
        """Events of one generation; one still running halt_grace_s after a halt is cancelled and ends "halted"."""
        hard_stop = asyncio.create_task(self._grace_after_halt())
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(events.__anext__())
                await asyncio.wait({step, hard_stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    log.warning("a generation was still running %.2f s after the halt: cancelled", self.halt_grace_s)
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await step
                    yield router_pb2.GenerateEvent(done=router_pb2.GenerationDone(
                        finish_reason="halted", notes=[f"cancelled {self.halt_grace_s:g} s after the halt"]))
                    return
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            hard_stop.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step
            await events.aclose()

    async def _grace_after_halt(self) -> None:
        """Return once the mesh has been halted for halt_grace_s (and still is)."""
        while True:
            await self.governance.switch.wait_halted()
            await asyncio.sleep(self.halt_grace_s)
            if self.governance.switch.is_halted:
                return

    async def close(self) -> None:
        """Close expert channels."""
        await self.pool.close()


class _Refused(Exception):
    """A registration refused with a gRPC status and a message naming the fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        """Refuse with this status and message."""
        super().__init__(message)
        self.code = code


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


async def _serves_router(ch) -> bool:
    """Whether the server behind an open channel serves the Router service (health checking says so)."""
    try:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE),
                                                           timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
