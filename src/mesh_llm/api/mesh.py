"""What the HTTP API asks of the router: model names, chat prompts, and Generate over loopback gRPC."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from mesh_llm.api.errors import ApiError, from_router
from mesh_llm.api.schemas import ChatMessage, CommonRequest, CompletionRequest
from mesh_llm.grpc_util import channel
from mesh_llm.mixing.selection import pick_family
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.client import RouterUnavailable, stream_generate
from mesh_llm.router.metrics import RouterMetrics

if TYPE_CHECKING:  # the API is built on a running router; these are only its types
    from mesh_llm.governance.core import Governance
    from mesh_llm.router.registry import Registry
    from mesh_llm.router.service import RouterService

MESH_MODEL = "mesh"  # the K-of-N mixture over the largest tokenizer family
FAMILY_PREFIX = "family-"


@dataclass(kw_only=True)
class ApiContext:
    router_address: str  # host:port of the router's gRPC server, dialled on loopback
    registry: Registry  # the router's Registry (experts, for /v1/models and the console)
    service: RouterService  # the RouterService (its tokenizer cache and expert pool render chat templates)
    governance: Governance  # Governance (halt state for clear errors)
    metrics: RouterMetrics  # the router's metrics (/metrics, HTTP request counts)
    keys: tuple[str, ...] = ()  # API keys; empty = no key needed
    console: bool = False  # serve /console
    created: int = field(default_factory=lambda: int(time.time()))  # "created" of the model entries

    def router_error(self, exc: RouterUnavailable) -> ApiError:
        """The ApiError for a refused or broken Generate call."""
        switch = self.governance.switch
        return from_router(exc, halted=switch.is_halted, halt_reason=switch.reason)


def family_id(fingerprint: str) -> str:
    """The model name of one tokenizer family."""
    return FAMILY_PREFIX + fingerprint[:12]


def _serving(registry) -> list:
    return [r for r in registry.experts() if r.state in ("online", "suspect")]


def model_entries(ctx: ApiContext) -> list[dict]:
    """/v1/models data: `mesh`, then each tokenizer family, then each model id (which mixes its family)."""
    records = _serving(ctx.registry)
    families: dict[str, list] = {}
    for r in records:
        families.setdefault(r.tokenizer_fingerprint, []).append(r)

    def entry(model_id: str, description: str, fingerprint: str, experts: list) -> dict:
        return {"id": model_id, "object": "model", "created": ctx.created, "owned_by": "mesh-llm",
                "mesh": {"description": description, "family": fingerprint,
                         "experts": [e.expert_id for e in experts],
                         "models": sorted({e.model_id for e in experts})}}

    largest = pick_family(ctx.registry.candidates(), None)
    entries = [entry(MESH_MODEL, "K-of-N mixture over the largest tokenizer family online",
                     largest[0].tokenizer_fingerprint if largest else "", records)]
    for fingerprint, experts in sorted(families.items()):
        entries.append(entry(family_id(fingerprint), "K-of-N mixture over this tokenizer family", fingerprint,
                             experts))
    by_model: dict[str, list] = {}
    for r in records:
        by_model.setdefault(r.model_id, []).append(r)
    for model_id, experts in sorted(by_model.items()):
        fingerprint = experts[0].tokenizer_fingerprint
        entries.append(entry(model_id, "K-of-N mixture over the tokenizer family of this model", fingerprint,
                             families[fingerprint]))
    return entries


def resolve_model(ctx: ApiContext, name: str) -> str:
    """The tokenizer fingerprint a model name asks for ("" = the router's choice); 404 when unknown."""
    if name == MESH_MODEL:
        return ""
    records = _serving(ctx.registry)
    for r in records:
        if name in (r.model_id, family_id(r.tokenizer_fingerprint), r.tokenizer_fingerprint):
            return r.tokenizer_fingerprint
    known = ", ".join(e["id"] for e in model_entries(ctx))
    raise ApiError(404, f"the model {name!r} does not exist in this mesh; models online: {known}",
                   param="model", code="model_not_found")


async def family_tokenizer(ctx: ApiContext, fingerprint: str) -> tuple[object, str]:
    """The tokenizer of a family ("" = the largest online) and its fingerprint, from the router's cache."""
    family = pick_family(ctx.registry.candidates(), fingerprint or None)
    if not family:
        raise ApiError(503, "no experts online; start one with `mesh-expert serve --join <token>`",
                       code="no_experts")
    record = ctx.registry.get(family[0].expert_id)
    service = ctx.service
    try:
        tokenizer = await service.tokenizers.get(record.tokenizer_fingerprint, service.pool.stub(record.address))
    except Exception as exc:
        raise ApiError(503, f"could not get the tokenizer from expert {record.expert_id}: {exc}",
                       code="tokenizer_unavailable") from None
    return tokenizer, record.tokenizer_fingerprint


def _plain_chat(messages: list[dict]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


async def chat_prompt(ctx: ApiContext, messages: list[ChatMessage], fingerprint: str) -> tuple[str, bool, str]:
    """(prompt, chat flag, family) for Generate: one user message goes as is with chat=True (the router
    applies the template); longer conversations are rendered here with the family's chat template."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].text(), True, fingerprint
    tokenizer, fingerprint = await family_tokenizer(ctx, fingerprint)
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return _plain_chat(turns), False, fingerprint
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # templates raise on roles or orders they do not support
        raise ApiError(400, f"this model family's chat template refused the messages: {exc}",
                       param="messages", code="invalid_messages") from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # the router's tokenizer call adds it again
    return text, False, fingerprint


def json_schema_of(body) -> str:
    """The JSON schema (as text) a response_format asks for; "" when none."""
    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return ""
    if fmt.type == "json_object":
        return json.dumps({"type": "object"})
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format json_schema needs a `schema` object", param="response_format")
    return json.dumps(schema)


def generate_request(body: CommonRequest, *, prompt: str, chat: bool, fingerprint: str, max_tokens: int | None,
                     json_schema: str = "") -> router_pb2.GenerateRequest:
    """The GenerateRequest for an API body (OpenAI's defaults where the router's differ)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # OpenAI's top_p=0 keeps only the most likely token; the router reads 0 as "off"
        temperature, top_p = 0.0, 1.0
    fields = dict(prompt=prompt, chat=chat, model_family=fingerprint, temperature=temperature, top_p=top_p,
                  max_tokens=max_tokens or 0, stop=body.stop or [], k=body.k or 0, policy=body.policy or "",
                  mix=body.mix or "", top_k=body.top_k or 0, fill=body.fill or "", extra=body.extra or 0,
                  sample_top_k=body.sample_top_k or 0, json_schema=json_schema, draft=body.draft or "",
                  draft_max=body.draft_max or 0)
    if body.seed is not None:
        fields["seed"] = body.seed
    return router_pb2.GenerateRequest(**fields)


async def open_generation(ctx: ApiContext, request: router_pb2.GenerateRequest) -> AsyncIterator:
    """Start Generate on the router; refusals raise ApiError before anything is sent to the HTTP client."""
    events = stream_generate(ctx.router_address, request)
    try:
        first = await anext(events)
    except RouterUnavailable as exc:
        await events.aclose()
        raise ctx.router_error(exc) from None
    except StopAsyncIteration:
        raise ApiError(502, "the router ended the generation without an answer") from None
    return _continue(ctx, first, events)


async def _continue(ctx: ApiContext, first, events) -> AsyncIterator:
    try:
        yield first
        async for event in events:
            yield event
    except RouterUnavailable as exc:
        raise ctx.router_error(exc) from None
    finally:
        await events.aclose()


def finish_error(ctx: ApiContext, done: router_pb2.GenerationDone) -> ApiError | None:
    """The ApiError for a generation that ended halted or failed; None when it finished normally."""
    if done.finish_reason == "halted":
        reason = ctx.governance.switch.reason
        return ApiError(503, f"the mesh was halted during this generation{f' ({reason})' if reason else ''}: "
                        f"governance's kill switch stops all generation until a quorum of `mesh resume` votes "
                        f"lifts it ({done.completion_tokens} token(s) were generated before the halt)",
                        type="service_unavailable_error", code="mesh_halted")
    if done.finish_reason == "error":
        notes = "; ".join(done.notes) or "no detail"
        return ApiError(503, f"the mesh could not finish this generation: {notes}", code="generation_failed")
    return None


def openai_finish(reason: str) -> str:
    """OpenAI's finish_reason for the router's (eos and stop strings are both "stop")."""
    return "length" if reason == "length" else "stop"


def score_request(body: CompletionRequest, fingerprint: str) -> router_pb2.ScoreRequest:
    """The router ScoreRequest that scores a completion body's prompt (text or token ids) exactly."""
    ids = body.token_ids()
    fields = dict(prompt="" if ids else body.prompt, token_ids=ids, k=body.k or 0, top_logprobs=body.logprobs or 0,
                  top_k=body.top_k or 0, policy=body.policy or "", model_family=fingerprint)
    if body.seed is not None:
        fields["seed"] = body.seed
    return router_pb2.ScoreRequest(**fields)


async def score(ctx: ApiContext, request: router_pb2.ScoreRequest, timeout: float = 600) -> router_pb2.ScoreReply:
    """Score on the router over loopback gRPC; refusals raise ApiError."""
    async with channel(ctx.router_address) as ch:
        try:
            return await router_pb2_grpc.RouterStub(ch).Score(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            refused = RouterUnavailable(f"router refused: {exc.details()} ({exc.code().name})")
            refused.__cause__ = exc
            raise ctx.router_error(refused) from None


async def prompt_text(ctx: ApiContext, body: CompletionRequest, fingerprint: str) -> str:
    """A completion body's prompt as text (token ids decoded with the family's tokenizer)."""
    ids = body.token_ids()
    if not ids:
        return body.prompt
    tokenizer, _ = await family_tokenizer(ctx, fingerprint)
    if any(i >= len(tokenizer) for i in ids):
        raise ApiError(400, f"the prompt has token ids outside the vocabulary of {len(tokenizer)}; tokenize with "
                       "the family's tokenizer", param="prompt")
    return tokenizer.decode(ids, skip_special_tokens=False)
