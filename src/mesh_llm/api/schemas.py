"""Request bodies of the OpenAI-compatible API, with the mesh's extensions as extra fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS = 1 << 20  # largest max_tokens / max_completion_tokens / sample_top_k accepted (the context clips below)


class StreamOptions(BaseModel):
    """stream_options of a streaming request."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # one more chunk with usage (and no choices) before [DONE]


class ResponseFormat(BaseModel):
    """response_format: plain text, any JSON object, or JSON valid under a schema (the router masks tokens)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # {"name": ..., "schema": {...}} when type is json_schema


class CommonRequest(BaseModel):
    """Fields both endpoints share; unknown fields are ignored as OpenAI's own server does with new ones."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)  # absent: 1, as OpenAI
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # mesh extensions
    k: int | None = Field(default=None, ge=1, le=256)  # experts mixed per token
    policy: str | None = None  # random, capacity, latency
    mix: str | None = None  # linear, geometric
    top_k: int | None = Field(default=None, ge=1, le=4096)  # entries asked of each expert
    fill: str | None = None  # spread, zero, floor
    extra: int | None = Field(default=None, ge=0, le=64)  # straggler over-selection
    sample_top_k: int | None = Field(default=None, ge=0, le=MAX_TOKENS)  # sample among this many most likely tokens
    draft: str | None = None  # drafter for multi-token rounds: none, ngram, model:NAME
    draft_max: int | None = Field(default=None, ge=1, le=16)  # most tokens drafted per round

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int:
        if n not in (None, 1):
            raise ValueError("the mesh returns one choice per request: n must be 1")
        return 1

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by the mesh; leave it out or set it to 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by the mesh")
        return self


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(CommonRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs are not returned by the mesh yet; leave logprobs out")
        if self.tools:
            raise ValueError("tool calls are not supported by the mesh; send tools=None")
        return self

    def completion_cap(self) -> int | None:
        """max_completion_tokens, or the older max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(CommonRequest):
    """Body of POST /v1/completions; echo + logprobs scores the prompt exactly (lm-evaluation-harness's request)."""

    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one prompt
    echo: bool = False  # return the prompt (and with logprobs, its tokens' exact mixture log-probabilities) first
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)  # alternatives per echoed token (needs echo)
    best_of: int | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)  # 0 (with echo): only score the prompt

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list) -> str | list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string or token list)")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt has no tokens")
        return prompt

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported by the mesh")
        if self.logprobs is not None and not self.echo:
            raise ValueError("logprobs need echo=true: the mesh scores the prompt's tokens exactly; "
                             "log-probabilities of generated tokens alone are not returned")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream=true; send stream=false")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: send echo=true with logprobs to score the prompt, "
                             "or max_tokens >= 1")
        if self.best_of not in (None, 1):
            raise ValueError("the mesh returns one choice per request: best_of must be 1")
        return self

    def token_ids(self) -> list[int]:
        """The prompt's token ids when it was sent as tokens; [] for a text prompt."""
        return [] if isinstance(self.prompt, str) else list(self.prompt)
