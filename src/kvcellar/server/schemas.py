"""Request and response bodies of the server, in the shapes of the OpenAI API.

Requests validate types only (a wrong type is a 422); value rules that OpenAI answers with a 400
(empty messages, ``n`` other than 1, ``temperature`` out of range, ...) are checked by the
handlers in :mod:`kvcellar.server.app`, which name the offending parameter. Fields the OpenAI
client may send but kvcellar does not use (``user``, ``metadata``, ``store``, ...) are ignored;
fields that would change the answer and cannot be honoured (tools, penalties, logprobs) are
declared here so the handlers can refuse them instead of silently ignoring them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- requests ---------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _SamplingRequest(_Request):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values (see the module docstring).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CacheControl(_Request):
    """Per-request semantic cache control (LiteLLM's shape): ``{"no-cache": true}`` skips the
    lookup, ``{"no-store": true}`` keeps the answer out of the cache, ``ttl`` in seconds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    no_cache: bool = Field(False, alias="no-cache")
    no_store: bool = Field(False, alias="no-store")
    ttl: float | None = Field(None, gt=0)
    category: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    cache: CacheControl | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingRequest):
    # A text, token ids, or a batch of one of them (OpenAI accepts batches; kvcellar takes one).
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class PromptBody(_Request):
    """A prompt for the controller API: exactly one of ``text``, ``messages`` or ``tokens``."""

    text: str | None = None
    messages: list[ChatMessage] | None = None
    tokens: list[int] | None = None


class PinBody(PromptBody):
    ttl_s: float | None = Field(None, description="seconds (None: until unpinned)")


class ClearBody(_Request):
    tenant: str | None = None
    tier: str | None = None
    all: bool = False


class SemanticFeedbackBody(_Request):
    """Was the answer served from the semantic cache (header ``x-kvcellar-cache-entry``) right?"""

    model_config = ConfigDict(extra="forbid")
    entry_id: int
    correct: bool


class SemanticClearBody(_Request):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None


# --- responses --------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A text completion; streamed chunks have the same shape (``finish_reason`` null until the
    last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvcellar"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    cache_enabled: bool
    queue_depth: int = Field(description="generations waiting for the model (FIFO lock)")
    requests_running: int
    requests_waiting: int = Field(description="requests waiting for a generation slot")


class LookupResponse(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    per_tier: dict[str, int]


class PinResponse(BaseModel):
    pinned_tokens: int


class UnpinResponse(BaseModel):
    unpinned_chunks: int


class ClearResponse(BaseModel):
    cleared: Literal["tenant", "tier", "all"]
    tenant: str | None = None
    tier: str | None = None
    deleted_entries: int


# --- errors -----------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error the client caused (or a busy server), answered in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "error")

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()
