"""The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the shared
conversation layer: content blocks -> `Conversation`, output events -> content blocks and
Anthropic's server-sent events; errors in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .conversation import Answer, Conversation, Engine, Prompt, internal_error, new_id, sse, typed_event
from .front import Front
from .messages import image_part
from .schema import APIError, Config, FunctionDef

# Anthropic's error types by HTTP status
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_body(e: APIError) -> dict:
    """An error as Anthropic's error object (the field it names is in the message)."""
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def guard_error_body(path: str, body: dict, status: int) -> dict:
    """The `guard` middleware's refusals (OpenAI's shape) in Anthropic's shape under /v1/messages."""
    if not path.startswith("/v1/messages"):
        return body
    error = body["error"]
    return error_body(APIError(status, error["message"], error.get("param"), error.get("code")))


# --- request ------------------------------------------------------------------------------------


class TextBlock(BaseModel):
    model_config = Config
    type: Literal["text"]
    text: str


class Base64Source(BaseModel):
    model_config = Config
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(BaseModel):
    model_config = Config
    type: Literal["url"]
    url: str


class ImageBlock(BaseModel):
    model_config = Config
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]


class ToolUseBlock(BaseModel):
    model_config = Config
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = Config
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool = False


class ThinkingBlock(BaseModel):
    model_config = Config
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    model_config = Config
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class MessageIn(BaseModel):
    model_config = Config
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolChoice(BaseModel):
    model_config = Config
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    model_config = Config
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class OutputConfig(BaseModel):
    model_config = Config
    format: dict[str, Any] | None = None
    effort: str | None = None


class CountRequest(BaseModel):
    model_config = Config
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


# --- conversion ---------------------------------------------------------------------------------


def _tools(tools: list[dict] | None) -> list[dict] | None:
    """Custom tools (`input_schema`) as the function schemas the template takes; Anthropic's
    server and client tools (web search, bash, text editor ...) are refused by type."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise APIError(
                400,
                f"tools[{i}].type: {kind!r} tools are not supported here; "
                "only custom tools with an input_schema",
                f"tools[{i}].type",
            )
        if not isinstance(tool.get("input_schema"), dict):
            raise APIError(400, f"tools[{i}].input_schema: is required (a JSON schema object)", f"tools[{i}]")
        try:
            fn = FunctionDef.model_validate({**tool, "parameters": tool["input_schema"]})
        except Exception as e:  # noqa: BLE001 (pydantic's message names the field)
            raise APIError(400, f"tools[{i}]: {e}", f"tools[{i}]") from None
        out.append({"type": "function", "function": fn.model_dump(exclude_none=True)})
    return out


def _image(block: ImageBlock, param: str, allow_files: Sequence[Path]) -> dict:
    source = block.source
    if isinstance(source, URLSource):
        return image_part(source.url, param, ".source.url", allow_files)  # remote URLs are refused there
    return image_part(f"data:{source.media_type};base64,{source.data}", param, ".source.data", allow_files)


def _result(block: ToolResultBlock, param: str) -> str | dict:
    content = block.content
    if isinstance(content, list):
        if any(isinstance(b, ImageBlock) for b in content):
            raise APIError(400, f"{param}.content: images in tool results are not supported", param)
        content = "".join(b.text for b in content)
    content = content or ""
    return {"error": content} if block.is_error else content


def to_messages(
    req: CountRequest, allow_files: Sequence[Path], escape: Callable[[str], str] = str
) -> list[dict]:
    """System, then the turns: tool results become tool messages (before the user's own text),
    an assistant's thinking its `reasoning_content`, tool_use blocks its calls. `escape`: the
    tokenizer's, for an assistant's text given back (answers never hold markup in text blocks,
    so special-token text there must not come back as control tokens)."""
    out: list[dict] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        param = f"messages[{i}].content"
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            msg: dict = {"role": "assistant", "content": ""}
            for j, b in enumerate(blocks):
                if isinstance(b, TextBlock):
                    msg["content"] += escape(b.text)
                elif isinstance(b, ThinkingBlock):
                    msg["reasoning_content"] = msg.get("reasoning_content", "") + b.thinking
                elif isinstance(b, ToolUseBlock):
                    names[b.id] = b.name
                    msg.setdefault("tool_calls", []).append(
                        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                    )
                elif not isinstance(b, RedactedThinkingBlock):  # opaque: nothing to render
                    raise APIError(
                        400, f"{param}[{j}]: {b.type} blocks are for user messages", f"{param}[{j}]"
                    )
            out.append(msg)
            continue
        parts: list[dict] = []
        for j, b in enumerate(blocks):
            where = f"{param}[{j}]"
            if isinstance(b, ToolResultBlock):
                if b.tool_use_id not in names:
                    raise APIError(
                        400,
                        f"{where}.tool_use_id: no earlier tool_use block has id {b.tool_use_id!r}",
                        f"{where}.tool_use_id",
                    )
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": b.tool_use_id,
                        "name": names[b.tool_use_id],
                        "content": _result(b, where),
                    }
                )
            elif isinstance(b, TextBlock):
                parts.append({"type": "text", "text": b.text})
            elif isinstance(b, ImageBlock):
                parts.append(_image(b, where, allow_files))
            else:
                raise APIError(400, f"{where}: {b.type} blocks are for assistant messages", where)
        if parts:
            text_only = all(p["type"] == "text" for p in parts)
            out.append({"role": "user", "content": "".join(p["text"] for p in parts) if text_only else parts})
    return out


def conversation(
    req: CountRequest, allow_files: Sequence[Path], escape: Callable[[str], str] = str
) -> Conversation:
    choice = req.tool_choice
    tool_choice: str | dict | None = None
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(
                    400, "tool_choice.name: is required when tool_choice.type is 'tool'", "tool_choice"
                )
            tool_choice = {"name": choice.name}
        else:
            tool_choice = {"any": "required"}.get(choice.type, choice.type)
    fmt = req.output_config.format if req.output_config else None
    sampling: dict = {}
    if isinstance(req, MessagesRequest):
        sampling = dict(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=list(req.stop_sequences or []),
        )
    return Conversation(
        to_messages(req, allow_files, escape),
        tools=_tools(req.tools),
        tool_choice=tool_choice,
        parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
        thinking=req.thinking is not None and req.thinking.type != "disabled",
        thinking_budget=req.thinking.budget_tokens if req.thinking is not None else None,
        response_format=fmt,
        limit_param="max_tokens",
        format_param="output_config.format",
        thinking_param="thinking",
        **sampling,
    )


def stop_reason(answer: Answer) -> str:
    if answer.tool_calls:
        return "tool_use"
    if answer.stop_sequence is not None:
        return "stop_sequence"
    return {"length": "max_tokens"}.get(answer.finish_reason, "end_turn")


def usage(answer: Answer) -> dict:
    s = answer.stats
    return {
        "input_tokens": s.prompt_tokens,  # Anthropic counts cache reads apart
        "cache_read_input_tokens": s.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": s.generation_tokens,
    }


def content_blocks(answer: Answer) -> list[dict]:
    blocks = []
    if answer.reasoning:
        blocks.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.content:
        blocks.append({"type": "text", "text": answer.content})
    blocks += [
        {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in answer.tool_calls
    ]
    return blocks


# --- routes -------------------------------------------------------------------------------------


def router(engine: Engine, front: Front, escape: Callable[[str], str] = str) -> APIRouter:
    """The routes; `escape`: the tokenizer's, for assistant text given back in `messages`."""
    api = APIRouter()

    def message(mid: str, model: str, content: list[dict], stop: Answer | None, prompt_tokens: int) -> dict:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": None if stop is None else stop_reason(stop),
            "stop_sequence": None if stop is None else stop.stop_sequence,
            "usage": usage(stop) if stop is not None else {"input_tokens": prompt_tokens, "output_tokens": 0},
        }

    @api.post("/v1/messages")
    async def create(request: Request):
        partition = front.authorize(request)
        req: MessagesRequest = front.parse(MessagesRequest, await front.read_json(request))
        conv, prompt, job = await engine.start(
            lambda: conversation(req, engine.allow_files, escape), partition
        )
        mid = new_id("msg_")
        if req.stream:
            start = message(mid, req.model, [], None, len(prompt.inputs.ids))
            return sse(job, stream(job, prompt, conv, start), typed_event)
        answer = await engine.answer(request, job, prompt, conv)
        return message(mid, req.model, content_blocks(answer), answer, 0)

    async def stream(job: Any, prompt: Prompt, conv: Conversation, start: dict) -> AsyncIterator[dict]:
        yield {"type": "message_start", "message": start}
        yield {"type": "ping"}
        index, open_kind = -1, None
        try:
            async for d in engine.deltas(job, prompt, conv):
                if isinstance(d, Answer):
                    if open_kind is not None:
                        yield {"type": "content_block_stop", "index": index}
                    yield {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(d), "stop_sequence": d.stop_sequence},
                        "usage": usage(d),
                    }
                    yield {"type": "message_stop"}
                    return
                if d.kind != open_kind or d.kind == "tool_call":
                    if open_kind is not None:
                        yield {"type": "content_block_stop", "index": index}
                    index, open_kind = index + 1, d.kind
                    if d.kind == "tool_call":
                        call = d.tool_call
                        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                    elif d.kind == "reasoning":
                        block = {"type": "thinking", "thinking": "", "signature": ""}
                    else:
                        block = {"type": "text", "text": ""}
                    yield {"type": "content_block_start", "index": index, "content_block": block}
                if d.kind == "tool_call":
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(d.tool_call.arguments)}
                elif d.kind == "reasoning":
                    delta = {"type": "thinking_delta", "thinking": d.text}
                else:
                    delta = {"type": "text_delta", "text": d.text}
                yield {"type": "content_block_delta", "index": index, "delta": delta}
        except Exception as e:  # noqa: BLE001 (a failure of ours, reported in the stream)
            yield {"type": "error", "error": {"type": "api_error", "message": internal_error(e).message}}

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        front.authorize(request)
        req: CountRequest = front.parse(CountRequest, await front.read_json(request))

        def count() -> int:
            return len(engine.prepare(conversation(req, engine.allow_files, escape)).inputs.ids)

        return {"input_tokens": await engine.prepared(count)}

    return api
