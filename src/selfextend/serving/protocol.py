"""OpenAI's request and response shapes for chat and text completions, models, health and errors, as pydantic models.

Requests are validated strictly (a string is not a number, "yes" is not a boolean). Fields OpenAI
defines that this server cannot honour are refused with a clear error rather than ignored; fields it
does not know are ignored, as OpenAI's own clients may send new ones.
"""

from __future__ import annotations

import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What both endpoints share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end-of-sequence token

    # OpenAI's fields this server cannot honour: field -> (the values that ask for nothing, what to call it)
    REFUSED: ClassVar[dict[str, tuple[tuple, str]]] = {
        "n": ((None, 1), "n other than 1"), "presence_penalty": ((None, 0), "a non-zero presence_penalty"),
        "frequency_penalty": ((None, 0), "a non-zero frequency_penalty"), "logprobs": ((None, False), "logprobs"),
        "tools": ((None, []), "tools"), "echo": ((None, False), "echo"), "best_of": ((None, 1), "best_of other than 1"),
        "suffix": ((None, ""), "suffix")}

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, (neutral, what) in self.REFUSED.items():
            if getattr(self, name, None) not in neutral:
                raise ValueError(f"{what}: not supported by this server")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type", "text") != "text":
            raise ValueError("only the text response format is supported")
        return value

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class PlanInfo(BaseModel):
    """Which position map answered the request (an extra field beside OpenAI's own); for STRING, G = 1,
    window_size is its shifted offset S and local_window its w."""

    method: str
    group_size: int
    window_size: int
    local_window: int | None
    effective_length: int | None
    reason: str
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    """A whole answer: `object` is "chat.completion" or "text_completion"."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice] | list[TextChoice]
    usage: Usage
    selfextend: PlanInfo


class ChatDelta(BaseModel):
    """What a streamed chat chunk adds; only the fields set are sent (the last chunk's delta is {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class TextChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the last carries `selfextend`, a usage chunk `usage`."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice] | list[TextChunkChoice]
    selfextend: PlanInfo | None = None
    usage: Usage | None = None

    def event(self) -> str:
        return f"data: {self.model_dump_json(exclude_unset=True)}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "selfextend"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    waiting: int
    model: str


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
