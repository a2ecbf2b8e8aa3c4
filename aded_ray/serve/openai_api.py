"""OpenAI-style request and response models, shared by HTTP and Python handles.

Validation is strict: JSON types are not coerced (``"5"``, ``true`` or ``1e3`` for an integer, ``"yes"`` for a
boolean are errors), unknown fields and unsupported options are errors (400 over HTTP, ``ValueError`` in
Python) that name the field, and text must be valid Unicode (no lone surrogates).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT = 1_048_576          # characters in any one string (the body limit binds first over HTTP)
MAX_TOKEN_ID = 2**31 - 1


def _unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode text (a lone surrogate at character {e.start})") from None
    return s


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_unicode)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_unicode)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    tool_call_id: Name | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """What the chat template receives: ``developer`` is OpenAI's newer name for ``system``."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class _Sampling(_Strict):
    model: Name | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=100_000, description="0 or -1: off (vLLM extension)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=1)
    user: Name | None = None
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    logprobs: bool | int | None = None
    return_stats: bool = Field(False, description="aded_ray extension: per-request speculative-decoding stats")
    private: bool | None = Field(None, description="aded_ray extension: keep this request's text out of the "
                                                   "drafter's local and shared history (default: the deployment's)")
    speculate: bool = Field(True, description="aded_ray extension: false decodes this request plainly (one "
                                              "token per step; the output is the same)")
    max_nodes: int | None = Field(None, ge=0, le=512, description="aded_ray extension: at most this many draft "
                                                                  "nodes per step for this request (0: none)")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and 0 < v < 1e-4:
            raise ValueError("temperature: 0 (greedy) or at least 0.0001")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(len(s) == 0 or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 strings of 1 to 256 characters")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def sampling_kwargs(self) -> dict:
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "top_k": max(self.top_k, 0),
                "seed": self.seed, "stop": self.stop, "speculate": self.speculate, "max_nodes": self.max_nodes}


class CompletionRequest(_Sampling):
    prompt: Annotated[Text, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] | None = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            return v[0]       # a list of one prompt: the same as the prompt (batches of several: rejected)
        return v

    def limit(self, default: int) -> int:
        return self.max_tokens or default


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def text_chars(req) -> int:
    """Characters of user text in a request (bounded before anything is tokenized)."""
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.text()) for m in req.messages)
    return len(req.prompt) if isinstance(req.prompt, str) else 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "aded_ray"}


def completion_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_out: int,
                        stats: dict | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(n_prompt, n_out)}
    if stats is not None:
        body["aded_stats"] = stats
    return body


def chat_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_out: int,
                  stats: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage(n_prompt, n_out)}
    if stats is not None:
        body["aded_stats"] = stats
    return body


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict:
    if chat:
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
