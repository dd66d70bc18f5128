"""The request bodies the server accepts (OpenAI's chat and text completions) and its error object."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

# Fields OpenAI clients send that change nothing here are accepted and ignored (extra="ignore");
# fields that would change the result and are not supported are refused by name.
Config = ConfigDict(extra="ignore")


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the field (`messages[0].content[1].image_url`): of a union's
    failed branches, the one that got furthest into the value."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _is_branch(part):
            param += f".{part}" if param else part
    message = err["msg"]
    if err["type"] == "missing":
        message = "is required"
    elif "input" in err:
        message = f"{message} (got {_short(err['input'])})"
    return APIError(400, f"{param or 'body'}: {message}", param or None, "invalid_value")


def _is_branch(part: str) -> bool:
    """Whether a location part names a union branch (`str`, `list[...]`, `TextPart`), not a field."""
    return (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict", "list", "none")
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class TextPart(BaseModel):
    model_config = Config
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = Config
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = Config
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = Config
    data: str
    format: str = Field(description="the container, e.g. wav, mp3, flac (read from the data itself)")


class AudioPart(BaseModel):
    model_config = Config
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(BaseModel):
    model_config = Config
    url: str


class VideoPart(BaseModel):
    """A video as vLLM and mlx-vlm take it: a base64 data URI, or a path under --allow-files."""

    model_config = Config
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = Config
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    model_config = Config
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = Config
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_needed(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class FunctionDef(BaseModel):
    model_config = Config
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = Config
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = Config
    name: str


class NamedToolChoice(BaseModel):
    model_config = Config
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = Config
    include_usage: bool = False


# Fields of OpenAI's and other servers' APIs that would change the result and are not implemented:
# refused by name rather than dropped.
REFUSED = (
    "best_of",
    "typical_p",
    "tfs_z",
    "top_a",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "dry_multiplier",
    "xtc_probability",
    "min_tokens",
    "ignore_eos",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "grammar",
    "json_schema",
    "prompt_logprobs",
    "prediction",
    "audio",
)


class Sampling(BaseModel):
    """Fields shared by both completion endpoints."""

    model_config = Config
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, body: Any) -> Any:
        if isinstance(body, dict):
            for name in REFUSED:
                value = body.get(name)
                if value is None or (name == "best_of" and value == 1) or value is False:
                    continue
                raise ValueError(f"{name}: not supported by this server (it would change the result)")
        return body

    @model_validator(mode="after")
    def _bias(self) -> Sampling:
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ValueError(f"logit_bias: {key!r}: expected token id keys and biases in [-100, 100]")
        return self

    @model_validator(mode="after")
    def _stops(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampler_fields(self) -> dict:
        """The fields both completion endpoints hand to the shared `Conversation` as they are."""
        return dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stops(),
        )


class TemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    # a JSON boolean only: "false" is a truthy string that used to switch thinking on
    enable_thinking: StrictBool | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def thinking(self) -> bool:
        switch = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        if switch is not None:
            return switch
        return self.reasoning_effort not in (None, "none")

    @property
    def thinking_param(self) -> str:
        """The field that asked for thinking (for errors)."""
        if self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking is not None:
            return "chat_template_kwargs.enable_thinking"
        return "reasoning_effort"


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: Literal[False] = False
    suffix: None = None
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def limit(self) -> int | None:
        return self.max_tokens
