"""The OpenAI API's request bodies and error objects, as far as lmkiln serves them.

Requests are validated here (types and ranges) before anything touches the model; every problem
becomes an `ApiError` that the app answers with OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` and an HTTP status. Fields of the OpenAI API that
lmkiln does not implement are ignored when they keep their default meaning (e.g. `user`) and
rejected when honouring them silently would change the answer (`n` > 1, `logprobs`).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the server answers with an OpenAI-style error object and `status`."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata, ...) are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    """Tokens to generate at most; absent means as many as the context and the server allow."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """0 is greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    """One choice per request (ask again for more)."""
    logprobs: Literal[False, None] = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(422, "stop: at most 4 non-empty strings", param="stop", code="invalid_value")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of max_tokens in the chat API."""

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: Literal[False] = False
    max_tokens: int | None = Field(16, ge=1)
    """The completions API's default is 16 tokens."""

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(422, "prompt: give one prompt per request", param="prompt", code="invalid_value")
        return self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse_body(raw: bytes, schema: type[_Request]) -> _Request:
    """The validated request, or an ApiError: 400 for malformed JSON, 422 for a wrong field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(422, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
