"""The Router gRPC servicer: registration, heartbeats, status and streaming generation."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import MeshHalted
from mesh_llm.governance.killswitch import HaltSwitch
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.drafting import DraftModels
from mesh_llm.router.generation import Generation, GenerationError
from mesh_llm.router.pool import ExpertPool
from mesh_llm.router.registry import ExpertSpec, Registry
from mesh_llm.router.scoring import ScoringError, score_request
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.tokenizers import TokenizerCache

log = logging.getLogger(__name__)


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
                 halt_grace_s: float = 0.5):
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

    async def _check_secret(self, given: str, context) -> None:
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "wrong or missing mesh secret; join with the invite token `mesh router serve` printed")

    async def RegisterExpert(self, request, context):
        await self._check_secret(request.mesh_secret, context)
        if not request.address or not request.info.tokenizer_fingerprint or not request.info.vocab_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "RegisterExpert needs an address and the expert's Info (fingerprint, vocab_size)")
        expert_id = self.registry.register(request.address, ExpertSpec.from_proto(request.info), name=request.name)
        await self.pool.forget(request.address)  # a restarted expert at the same address gets a fresh channel
        return router_pb2.RegisterExpertReply(expert_id=expert_id,
                                              heartbeat_interval_s=self.registry.config.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        await self._check_secret(request.mesh_secret, context)
        known = self.registry.heartbeat(request.expert_id, active_sessions=request.active_sessions,
                                        tokens_per_second=request.tokens_per_second)
        return router_pb2.HeartbeatReply(known=known)

    async def Deregister(self, request, context):
        await self._check_secret(request.mesh_secret, context)
        # its channel stays open: Step calls already under way may still finish within the expert's grace period
        return router_pb2.DeregisterReply(known=self.registry.deregister(request.expert_id, reason=request.reason))

    async def ListExperts(self, request, context):
        return router_pb2.ListExpertsReply(experts=[r.to_proto() for r in self.registry.experts()])

    async def GetRouterStatus(self, request, context):
        s, switch = self.settings, self.governance.switch
        return router_pb2.RouterStatus(
            experts=[r.to_proto() for r in self.registry.experts()], default_k=s.default_k,
            default_policy=s.default_policy, default_mix=s.default_mix, halted=switch.is_halted,
            halt_reason=switch.reason, recent_tokens_per_second=self.recent_tokens_per_second(),
            active_generations=len(self.active), phase=self.governance.phase().phase,
            default_draft=s.default_draft, **self.recent_rounds())

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
        try:
            generation = Generation(request=request, registry=self.registry, pool=self.pool,
                                    tokenizers=self.tokenizers, settings=self.settings, halt=self.halt,
                                    draft_models=self.draft_models)
            await generation.start()
        except GenerationError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        task = asyncio.current_task()
        self.active.add(task)
        tokens = 0
        try:
            async for event in self._halt_bounded(generation.run()):
                tokens += event.HasField("token")
                if event.HasField("done") and event.done.rounds:
                    self._rounds.append(event.done)
                yield event
        finally:
            self.active.discard(task)
            self._recent.append((time.monotonic(), tokens))

    async def Score(self, request, context):
        if self.governance.switch.is_halted:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the mesh is halted ({self.governance.switch.reason}); "
                                "a quorum of `mesh resume` votes lifts it")
        try:
            return await score_request(request, registry=self.registry, pool=self.pool, tokenizers=self.tokenizers,
                                       settings=self.settings)
        except ScoringError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

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
