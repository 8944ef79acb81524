"""/v1/models, /v1/chat/completions and /v1/completions in OpenAI's shapes, streaming (SSE) or not.

/v1/completions with echo=true returns the prompt first; with logprobs=N its tokens come with their
exact log-probability under the linear mixture of the experts the router picks (Score: one Step per
expert with score_ids, nothing filled from rest mass) and the mixture's top N alternatives, in the
legacy shape lm-evaluation-harness parses (tokens, token_logprobs with null first, top_logprobs,
text_offset). With max_tokens > 0 the generated tokens follow (a normal generation of the prompt
text); their top_logprobs hold the chosen token only.

A non-streaming generation is cancelled when its client hangs up (a stream already is, by Starlette);
a prompt or request larger than the router's gRPC message limit answers 413; a model name that
names no family gets the router's family (`--family`, else the first expert checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from mesh_llm.api.errors import ApiError
from mesh_llm.api.mesh import (
    ApiContext,
    chat_prompt,
    finish_error,
    generate_request,
    json_schema_of,
    model_entries,
    open_generation,
    openai_finish,
    prompt_text,
    resolve_model,
    score,
    score_request,
)
from mesh_llm.api.schemas import ChatCompletionRequest, CompletionRequest
from mesh_llm.grpc_util import DEFAULT_MAX_MESSAGE

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_REQUEST_BYTES = DEFAULT_MAX_MESSAGE  # the router's gRPC message limit: a larger prompt cannot be sent to it


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
    _check_size(sum(len(m.text().encode()) for m in body.messages))
    fingerprint = _family(ctx, body.model)
    schema = json_schema_of(body)
    prompt, chat, fingerprint = await chat_prompt(ctx, body.messages, fingerprint)
    generate = _generate_request(body, prompt=prompt, chat=chat, fingerprint=fingerprint,
                                 max_tokens=body.completion_cap(), json_schema=schema)
    return await _answer(ctx, body, generate, _Shape(chat=True), request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    """A plain continuation of the prompt from the mesh, streamed or whole; with echo, the prompt (scored) first."""
    ctx = context(request)
    _check_size(len(body.prompt.encode()) if isinstance(body.prompt, str) else 5 * len(body.prompt))
    fingerprint = _family(ctx, body.model)
    if body.echo:
        return await _echo(ctx, body, fingerprint, request)
    generate = _generate_request(body, prompt=await prompt_text(ctx, body, fingerprint), chat=False,
                                 fingerprint=fingerprint, max_tokens=body.max_tokens)
    return await _answer(ctx, body, generate, _Shape(chat=False), request)


def _family(ctx: ApiContext, model: str) -> str:
    """The family a model name asks for; for `mesh`, the router's own family (not the one with most experts)."""
    return resolve_model(ctx, model) or ctx.service.family()


def _check_size(size: int) -> None:
    """413 for a prompt or request the router's gRPC message limit would refuse."""
    if size > MAX_REQUEST_BYTES:
        raise ApiError(413, f"the prompt is {size:,} bytes; the router accepts requests up to "
                       f"{MAX_REQUEST_BYTES:,} bytes: send a shorter prompt", code="request_too_large")


def _generate_request(body, **fields):
    """generate_request with the router's over-selection default kept when the body names no `extra`."""
    generate = generate_request(body, **fields)
    if body.extra is None:
        generate.ClearField("extra")
    _check_size(generate.ByteSize())
    return generate


async def _answer(ctx: ApiContext, body, generate, shape: _Shape, http: Request):
    if body.stream:
        events = await open_generation(ctx, generate)  # refusals become HTTP errors before any byte is sent
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(ctx, events, shape, body.model, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    _, done, experts = await _collect(ctx, generate, http)
    return {"id": shape.new_id(), "object": shape.object, "created": int(time.time()), "model": body.model,
            "system_fingerprint": None, "choices": [shape.choice(done.text, openai_finish(done.finish_reason))],
            "usage": _usage(done), "mesh": _summary(done, experts)}


async def _collect(ctx: ApiContext, generate, http: Request) -> tuple[list, object, Counter]:
    """Run a generation to its end: (token events, summary, tokens per expert); ApiError if it failed.

    The generation is cancelled (its Generate call too, so the router stops) when the client hangs up.
    """
    events = await open_generation(ctx, generate)
    tokens: list = []
    experts: Counter = Counter()
    done = None

    async def drain() -> None:
        nonlocal done
        async for event in events:
            if event.HasField("token"):
                tokens.append(event.token)
                experts.update(event.token.expert_ids)
            else:
                done = event.done

    run = asyncio.ensure_future(drain())
    hangup = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({run, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            raise ApiError(499, "the client closed the connection; the generation was cancelled")
        run.result()
    finally:
        for task in (run, hangup):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await events.aclose()
    if done is None:
        raise ApiError(502, "the router ended the generation without a summary")
    error = finish_error(ctx, done)
    if error is not None:
        raise error
    return tokens, done, experts


async def _echo(ctx: ApiContext, body: CompletionRequest, fingerprint: str, http: Request) -> dict:
    """The prompt scored exactly through the mesh (Score), then any generated tokens, as one text_completion."""
    scoring = score_request(body, fingerprint)
    _check_size(scoring.ByteSize())
    scored = await score(ctx, scoring)
    generated, done, experts = [], None, Counter()
    if body.max_tokens != 0:
        generate = _generate_request(body, prompt=scored.text, chat=False, fingerprint=scored.model_family,
                                     max_tokens=body.max_tokens)
        generated, done, experts = await _collect(ctx, generate, http)
    finish = openai_finish(done.finish_reason) if done else "length"
    choice = {"index": 0, "text": scored.text + (done.text if done else ""), "finish_reason": finish,
              "logprobs": None if body.logprobs is None else _echo_logprobs(scored, generated)}
    completion_tokens = done.completion_tokens if done else 0
    mesh = {"scored_by": [e.expert_id for e in scored.experts], "weights": [e.weight for e in scored.experts],
            "score_seconds": round(scored.seconds, 4), **(_summary(done, experts) if done else {})}
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": None, "choices": [choice],
            "usage": {"prompt_tokens": len(scored.tokens), "completion_tokens": completion_tokens,
                      "total_tokens": len(scored.tokens) + completion_tokens}, "mesh": mesh}


def _echo_logprobs(scored, generated: list) -> dict:
    """OpenAI's legacy logprobs object: the scored prompt tokens (first without a value), then generated ones."""
    tokens, values, tops, offsets = [], [], [], []
    for t in scored.tokens:
        tokens.append(t.text)
        offsets.append(t.text_offset)
        if not t.HasField("logprob"):
            values.append(None)
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for a in t.alternatives:
            top.setdefault(a.text, a.logprob)
        top.setdefault(t.text, t.logprob)  # the chosen token is always listed, as OpenAI does
        values.append(t.logprob)
        tops.append(top)
    at = len(scored.text)
    for g in generated:
        tokens.append(g.text)
        offsets.append(at)
        at += len(g.text)
        values.append(g.logprob)
        tops.append({g.text: g.logprob})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def _disconnected(http: Request) -> None:
    """Return once the HTTP client has gone (its body was read, so the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # a server that hands the (already read) body out again must not spin


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
