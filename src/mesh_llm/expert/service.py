"""The Expert gRPC servicer: validates requests, batches steps on one worker thread, packs replies."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

import mesh_llm
from mesh_llm.expert.batching import StepCall, StepGatherer
from mesh_llm.expert.engine import StepEngine, StepError
from mesh_llm.expert.metrics import ExpertMetrics
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import encode_topk

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class ExpertService(expert_pb2_grpc.ExpertServicer):
    """Serves Info, Step, Rollback and CloseSession for one loaded model."""

    def __init__(self, engine: StepEngine, delay_ms: float = 0.0):
        self.engine = engine
        self.delay_s = delay_ms / 1000  # emulated network latency added to every Step
        # the model, its caches and the session table are touched by this one thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-step")
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.metrics = ExpertMetrics(sessions=lambda: len(engine.sessions),
                                     evictions=lambda: engine.sessions.evictions)
        self.gatherer = StepGatherer(engine.step_batch, self._worker, engine.sessions.limits.max_batch,
                                     on_batch=self.metrics.batch_size.observe)

    def info(self) -> expert_pb2.ExpertInfo:
        """This expert's ExpertInfo message."""
        loaded = self.engine.loaded
        return expert_pb2.ExpertInfo(
            model_id=loaded.model_id, tokenizer_fingerprint=loaded.fingerprint, vocab_size=loaded.vocab_size,
            context_limit=loaded.context_limit, device=loaded.device, quantization=loaded.quantization,
            dtype=loaded.dtype, tokens_per_second=self.engine.tokens_per_second, max_top_k=self.engine.max_top_k,
            eos_token_ids=list(loaded.eos_token_ids), max_sessions=self.engine.sessions.limits.max_sessions,
            expert_version=mesh_llm.__version__,
        )

    async def _run(self, context: grpc.aio.ServicerContext, fn, *args):
        return await self._answer(context, asyncio.get_running_loop().run_in_executor(self._worker, fn, *args))

    async def _answer(self, context: grpc.aio.ServicerContext, work):
        """The result of awaiting work; a failure aborts the call with its status, the server keeps serving."""
        self.requests += 1
        try:
            return await work
        except StepError as exc:
            self.failures[exc.code] = self.failures.get(exc.code, 0) + 1
            self.metrics.failures.labels(exc.code).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except Exception as exc:  # keep serving other sessions whatever one step hits
            log.exception("step failed")
            self.failures["INTERNAL"] = self.failures.get("INTERNAL", 0) + 1
            self.metrics.failures.labels("INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"expert failed on this step: {type(exc).__name__}: {exc}")

    async def Info(self, request, context):
        self.metrics.requests["Info"].inc()
        return self.info()

    async def Step(self, request: expert_pb2.StepRequest, context):
        self.metrics.requests["Step"].inc()
        if request.encoding not in (expert_pb2.LOGPROB_F32, expert_pb2.LOGPROB_F16):
            self.metrics.failures.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown logprob encoding {request.encoding}")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        value_bytes = 2 if request.encoding == expert_pb2.LOGPROB_F16 else 4
        call = StepCall(session_id=request.session_id, start=request.start_position, tokens=list(request.tokens),
                        top_k=request.top_k, all_positions=request.all_positions,
                        score_ids=list(request.score_ids), value_bytes=value_bytes)
        result = await self._answer(context, self.gatherer.submit(call))
        self.metrics.step_seconds.observe(result.compute_ms / 1000)
        self.metrics.tokens.inc(len(request.tokens))
        self.metrics.distributions.inc(len(result.distributions))
        return expert_pb2.StepReply(
            distributions=[encode_topk(d.ids, d.logprobs, d.rest_logmass, request.encoding)
                           for d in result.distributions],
            session_length=result.session_length, compute_ms=result.compute_ms, encoding=request.encoding,
            score_logprobs=result.scores.tolist(),
        )

    async def Rollback(self, request, context):
        self.metrics.requests["Rollback"].inc()
        length = await self._run(context, self.engine.rollback, request.session_id, request.length)
        return expert_pb2.RollbackReply(session_length=length)

    async def CloseSession(self, request, context):
        self.metrics.requests["CloseSession"].inc()
        existed = await self._run(context, self.engine.close, request.session_id)
        return expert_pb2.CloseSessionReply(existed=existed)

    async def GetTokenizer(self, request, context):
        self.metrics.requests["GetTokenizer"].inc()
        for name, data in self.engine.tokenizer_files().items():
            for offset in range(0, max(len(data), 1), CHUNK):
                yield expert_pb2.FileChunk(name=name, offset=offset, data=data[offset:offset + CHUNK])

    def start_speed_probe(self) -> None:
        """Queue a short decode probe on the engine's thread; Info reports its tokens/s once done."""
        asyncio.get_running_loop().run_in_executor(self._worker, self.engine.measure_speed)

    async def sweep_idle(self) -> None:
        """Drop idle sessions (runs on the engine's thread)."""
        await asyncio.get_running_loop().run_in_executor(self._worker, self.engine.sessions.enforce)

    def shutdown(self) -> None:
        """Stop batching and the worker thread."""
        self.gatherer.close()
        self._worker.shutdown(wait=False, cancel_futures=True)
