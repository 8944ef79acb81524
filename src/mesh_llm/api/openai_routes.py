"""/v1/models, /v1/chat/completions and /v1/completions in OpenAI's shapes, streaming (SSE) or not."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from mesh_llm.api.errors import ApiError
from mesh_llm.api.mesh import (ApiContext, chat_prompt, finish_error, generate_request, json_schema_of, model_entries,
                               open_generation, openai_finish, resolve_model)
from mesh_llm.api.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def context(request: Request) -> ApiContext:
    """The ApiContext of the app serving this request."""
    return request.app.state.ctx


@dataclass(frozen=True)
class _Shape:
    chat: bool  # chat.completion or text_completion

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def new_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def choice(self, text: str, finish: str) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def chunk_choice(self, text: str | None, finish: str | None, *, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _summary(done, experts: Counter) -> dict:
    return {"finish_reason": done.finish_reason, "notes": list(done.notes),
            "tokens_per_second": round(done.tokens_per_second, 3),
            "time_to_first_token_s": round(done.time_to_first_token_s, 4), "tokens_by_expert": dict(experts)}


@router.get("/models")
async def list_models(request: Request) -> dict:
    """Every model name this mesh answers to."""
    return {"object": "list", "data": model_entries(context(request))}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    """One model entry; 404 in the OpenAI shape when unknown."""
    ctx = context(request)
    fingerprint = resolve_model(ctx, model_id)
    entries = model_entries(ctx)
    named = [e for e in entries if e["id"] == model_id]
    return named[0] if named else next(e for e in entries[1:] if e["mesh"]["family"] == fingerprint)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat answer from the mesh (the family's chat template applied), streamed or whole."""
    ctx = context(request)
    fingerprint = resolve_model(ctx, body.model)
    schema = json_schema_of(body)
    prompt, chat, fingerprint = await chat_prompt(ctx, body.messages, fingerprint)
    generate = generate_request(body, prompt=prompt, chat=chat, fingerprint=fingerprint,
                                max_tokens=body.completion_cap(), json_schema=schema)
    return await _answer(ctx, body, generate, _Shape(chat=True))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    """A plain continuation of the prompt from the mesh, streamed or whole."""
    ctx = context(request)
    fingerprint = resolve_model(ctx, body.model)
    generate = generate_request(body, prompt=body.prompt, chat=False, fingerprint=fingerprint,
                                max_tokens=body.max_tokens)
    return await _answer(ctx, body, generate, _Shape(chat=False))


async def _answer(ctx: ApiContext, body, generate, shape: _Shape):
    events = await open_generation(ctx, generate)  # refusals become HTTP errors before any byte is sent
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(ctx, events, shape, body.model, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    experts: Counter = Counter()
    done = None
    try:
        async for event in events:
            if event.HasField("token"):
                experts.update(event.token.expert_ids)
            else:
                done = event.done
    finally:
        await events.aclose()
    if done is None:
        raise ApiError(502, "the router ended the generation without a summary")
    error = finish_error(ctx, done)
    if error is not None:
        raise error
    return {"id": shape.new_id(), "object": shape.object, "created": int(time.time()), "model": body.model,
            "system_fingerprint": None, "choices": [shape.choice(done.text, openai_finish(done.finish_reason))],
            "usage": _usage(done), "mesh": _summary(done, experts)}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(ctx: ApiContext, events, shape: _Shape, model: str, include_usage: bool) -> AsyncIterator[str]:
    """One chunk per token (with the ids of the experts mixed for it), a final chunk, usage, [DONE]."""
    head = {"id": shape.new_id(), "object": shape.chunk_object, "created": int(time.time()), "model": model,
            "system_fingerprint": None}
    sent = ""
    done = None
    experts: Counter = Counter()
    try:
        if shape.chat:
            yield _event({**head, "choices": [shape.chunk_choice("", None, role=True)]})
        async for event in events:
            if event.HasField("token"):
                token = event.token
                sent += token.text
                experts.update(token.expert_ids)
                yield _event({**head, "choices": [shape.chunk_choice(token.text, None)],
                              "mesh": {"experts": list(token.expert_ids), "token_id": token.token_id}})
            else:
                done = event.done
    except ApiError as exc:
        yield _event(exc.body())
        return
    finally:
        await events.aclose()
    error = ApiError(502, "the router ended the generation without a summary") if done is None \
        else finish_error(ctx, done)
    if error is not None:
        yield _event(error.body())
        return
    rest = done.text[len(sent):] if done.text.startswith(sent) else ""  # text the router held back, if any
    yield _event({**head, "choices": [shape.chunk_choice(rest or None, openai_finish(done.finish_reason))],
                  "mesh": _summary(done, experts)})
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(done)})
    yield "data: [DONE]\n\n"
