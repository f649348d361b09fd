"""The OpenAI-compatible request bodies (validated with pydantic) and the response objects built from the engine's
events. Bad input becomes an APIError, which the app answers as OpenAI-shaped JSON."""
from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..engine.config import GenerationConfig

MAX_STOPS = 16


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Fields other servers take and we do not know are ignored (as llama.cpp's server does); the ones we know but do
    # not support are refused below, so that nobody gets a silently different answer.
    model_config = ConfigDict(extra="ignore", strict=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's -1, llama.cpp's 0)
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    seed: Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 64)] | None = None
    stop: str | list[str] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # llama.cpp's and vLLM's extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}: only n=1 is supported (send the request several times for several answers)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def config(self, max_tokens: int | None) -> GenerationConfig:
        """The engine's settings: what the request gives, GenerationConfig's defaults (llama.cpp's) for the rest;
        max_tokens defaults to what is left of the context."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "min_p", "seed",
                                                         "frequency_penalty", "presence_penalty",
                                                         "repetition_penalty") if getattr(self, name) is not None}
        if self.top_k is not None:
            given["top_k"] = max(self.top_k, 0)
        try:
            return GenerationConfig(**given, max_tokens=max_tokens, stop=tuple(self.stop or ()),
                                    ignore_eos=self.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _refuse(body: _Body, unsupported: dict[str, Any]) -> None:
    for name, allowed in unsupported.items():
        value = getattr(body, name, None)
        if value not in allowed:
            raise APIError(400, f"{name} is not supported by this server", param=name)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def checked(self) -> "ChatRequest":
        _refuse(self, {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, [])})
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
        return self

    def conversation(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def checked(self) -> "CompletionRequest":
        _refuse(self, {"echo": (False,), "suffix": (None, ""), "logprobs": (None, 0), "best_of": (None, 1)})
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (a list of several is a batch, which needs n>1)",
                               param="prompt")
        if self.prompt in ("", []) or self.prompt == [""]:
            raise APIError(400, "prompt is empty", param="prompt")
        return self

    def input(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], str) else p

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(model: type[_Body], data: Any) -> Any:
    """A validated request, or APIError(400) naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data).checked()
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {msg}" if where else msg, param=where or None) from None


# --- responses ---
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(id_: str, kind: str, model: str, choices: list, **extra) -> dict:
    return {"id": id_, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
