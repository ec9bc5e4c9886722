"""Request bodies of the OpenAI-compatible API, as pydantic models, and the error body.

Types are strict: `"max_tokens": "5"` is a 400, not a 5. Fields OpenAI defines but this server
does not implement are accepted only at their neutral value, so a client never silently gets
something other than what it asked for; unknown fields are refused by name. The sampling extras
the serving engines of this field accept (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, ...) are accepted too (the `openai` client sends them through `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from parallm.errors import UserError
from parallm.inference.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.logit_bias:
            raise ValueError("logit_bias: is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def sampling_params(self, max_tokens: int, **more: Any) -> SamplingParams:
        """The engine's parameters (UserError naming the field for an invalid value)."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "seed",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
            )
            if getattr(self, name) is not None
        }
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            stop=[] if self.stop is None else self.stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **given,
            **more,
        )


TokenIds = list[Annotated[int, Field(strict=True)]]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        if self.suffix:
            raise ValueError("suffix: is not supported by this server; leave it out")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string, strings, one list of ids, lists of ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise UserError("prompt: empty list; give a string, strings or token ids")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) are passed to the chat template, as transformers does.
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_unsupported(self) -> ChatCompletionRequest:
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: tool calling is not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    def rendered_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            extra = {k: v for k, v in (m.model_extra or {}).items()}
            out.append({**extra, "role": m.role, "content": m.text()})
        return out


# A file system path cannot hold a NUL character (the OS refuses it before looking).
_NO_NUL = {"pattern": "^[^\\x00]*$"}


class LoraAdapterRequest(_Strict):
    """POST /v1/admin/lora_adapters: load the peft directory `path` (on the server) as `name`."""

    name: str
    path: str = Field(json_schema_extra=_NO_NUL)

    @model_validator(mode="after")
    def _path_without_nul(self) -> LoraAdapterRequest:
        if "\x00" in self.path:
            raise ValueError("path: contains a NUL character; give a directory on the server")
        return self


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; UserError with the first problem's field path."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        msg = err["msg"]
        if err["type"] == "json_invalid":
            raise UserError(
                f"body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", param=None
            ) from None
        if err["type"] == "value_error":  # our own checks: "field: reason"
            text = msg.removeprefix("Value error, ")
            raise UserError(text) from None
        if err["type"] == "extra_forbidden":
            raise UserError(f"{loc}: unknown field; leave it out", param=loc) from None
        if err["type"] == "missing":
            raise UserError(f"{loc}: is required", param=loc) from None
        given = err.get("input")
        shown = (
            repr(given) if not isinstance(given, dict | list) else f"a JSON {type(given).__name__}"
        )
        if not loc:
            raise UserError(f"the request body must be a JSON object, not {shown}") from None
        valid = _UNION_FIELDS.get(loc.rsplit(".", 1)[-1]) if len(e.errors()) > 1 else None
        raise UserError(f"{loc}: {shown} is not valid; {valid or msg.lower()}", param=loc) from None


# What a field of several accepted shapes takes, for the error when a value fits none.
_UNION_FIELDS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of such lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of {'type': 'text', 'text': ...} parts",
    "tool_choice": "must be a string or an object",
}


def _is_union_tag(part: int | str) -> bool:
    """pydantic names the member of a union that failed in the error's path ("prompt.str",
    "stop.list[str]", "content.TextPart"); a field name is lower-case and plain."""
    if isinstance(part, int):
        return False
    return "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "list")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- response bodies (what /openapi.json declares; the server test fuzzes against them) ----------


class _Out(BaseModel):
    # A response carries exactly these fields: an undocumented one is a contract violation.
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(_Out):
    """OpenAI's error body, for every 4xx and 5xx and for an error event in a stream."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "abort"]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Out):
    """One event of a streamed completion; the last (with `stream_options.include_usage`) has
    no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None  # the first chunk of each choice
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    """One event of a streamed chat completion; the last (with `stream_options.include_usage`)
    has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    """The base model (`parent` null) or a loaded LoRA adapter (`parent`: the base)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class LoadedAdapter(ModelCard):
    in_flight: int  # requests running on it


class UnloadedAdapter(_Out):
    """An adapter unloaded while requests still ran on it; its slot is free once they end."""

    id: str
    root: str
    in_flight: int
    unloaded: Literal[True]


class AdapterList(_Out):
    object: Literal["list"]
    data: list[LoadedAdapter | UnloadedAdapter]


class AdapterDeleted(_Out):
    id: str
    object: Literal["model"]
    deleted: Literal[True]
    in_flight: int  # requests admitted before the unload, finishing on the adapter


class Health(_Out):
    status: Literal["ok"]


class Draining(_Out):
    """/health while the server shuts down (503): out of rotation, running requests finish."""

    status: Literal["draining"]


# -- videos (OpenAI's video API; `parallm.serve.videos`) ------------------------------------------


class VideoRequest(_Strict):
    """POST /v1/videos: OpenAI's create-video body (`prompt`, `model`, `seconds`, `size` "WxH")
    and parallm's `frames` (instead of `seconds`), `steps`, `guidance` and `seed`. Left out,
    `model` is the served video model and the rest the model's defaults."""

    prompt: str
    model: str | None = None
    seconds: str | int | None = None  # OpenAI sends a string ("4"); frames = seconds x fps
    frames: int | None = None
    size: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _one_length(self) -> VideoRequest:
        if self.seconds is not None and self.frames is not None:
            raise ValueError("seconds: give seconds or frames, not both")
        return self


class VideoError(_Out):
    code: str
    message: str


class Video(_Out):
    """A video job (OpenAI's video object, plus what parallm generated it with)."""

    id: str
    object: Literal["video"]
    status: Literal["queued", "in_progress", "completed", "failed"]
    model: str
    prompt: str
    created_at: int
    completed_at: int | None
    expires_at: int | None
    progress: int  # percent
    seconds: str  # frames / fps
    size: str  # "WxH"
    error: VideoError | None
    frames: int
    fps: float
    steps: int
    guidance: float
    seed: int


class VideoList(_Out):
    object: Literal["list"]
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(_Out):
    id: str
    object: Literal["video.deleted"]
    deleted: Literal[True]
