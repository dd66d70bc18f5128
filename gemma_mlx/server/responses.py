"""The OpenAI Responses API (`POST /v1/responses`, GET/DELETE `/v1/responses/{id}`) over the shared
conversation layer: request items -> `Conversation`, output events -> response items and typed
server-sent events; stored responses (for `previous_response_id`) in a bounded LRU store."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Discriminator, Field, Tag

from ..tools import Delta
from .conversation import (
    Answer,
    Conversation,
    Engine,
    Prompt,
    internal_error,
    leading_system,
    new_id,
    sse,
    typed_event,
)
from .front import Front
from .messages import audio_part, image_part, parse_arguments_json
from .schema import APIError, Config, FunctionDef

STORE_RESPONSES = 512  # responses kept for previous_response_id / GET (least recently used go first)
STORE_BYTES = 64 << 20  # ... and their JSON's total size


# --- request ------------------------------------------------------------------------------------


class InputText(BaseModel):
    model_config = Config
    type: Literal["input_text", "output_text", "text"]
    text: str


class Refusal(BaseModel):
    model_config = Config
    type: Literal["refusal"]
    refusal: str


class InputImage(BaseModel):
    model_config = Config
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class AudioData(BaseModel):
    model_config = Config
    data: str
    format: str


class InputAudio(BaseModel):
    model_config = Config
    type: Literal["input_audio"]
    input_audio: AudioData


ContentPart = Annotated[InputText | Refusal | InputImage | InputAudio, Field(discriminator="type")]


class MessageItem(BaseModel):
    model_config = Config
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(BaseModel):
    model_config = Config
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = Config
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class SummaryText(BaseModel):
    model_config = Config
    type: Literal["summary_text"]
    text: str


class ReasoningText(BaseModel):
    model_config = Config
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(BaseModel):
    model_config = Config
    type: Literal["reasoning"]
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")  # an "easy" message has no type
    return getattr(value, "type", None)


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class ReasoningConfig(BaseModel):
    model_config = Config
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class TextConfig(BaseModel):
    model_config = Config
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class NamedFunction(BaseModel):
    model_config = Config
    type: Literal["function"]
    name: str


class ResponsesRequest(BaseModel):
    model_config = Config
    model: str
    input: str | list[Item] = ""
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    background: Literal[False] | None = None
    conversation: None = None


# --- conversion ---------------------------------------------------------------------------------


def _tools(tools: list[dict] | None, param: str = "tools") -> list[dict] | None:
    """Function tools in the Chat Completions shape the template takes; the function tools of a
    `namespace` are declared as NAMESPACE.NAME; hosted tools are refused by type."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind, where = tool.get("type"), f"{param}[{i}]"
        if kind == "namespace" and isinstance(tool.get("tools"), list):
            ns = tool.get("name")
            for t in _tools(tool["tools"], f"{where}.tools") or []:
                t["function"]["name"] = f"{ns}.{t['function']['name']}"
                out.append(t)
            continue
        if kind != "function":
            raise APIError(
                400,
                f"{where}.type: {kind!r} tools are not supported here (hosted tools run on OpenAI's "
                "servers); only 'function' tools",
                f"{where}.type",
                "unsupported_value",
            )
        try:
            fn = FunctionDef.model_validate(tool)
        except Exception as e:  # noqa: BLE001 (pydantic's message names the field)
            raise APIError(400, f"{where}: {e}", where) from None
        out.append({"type": "function", "function": fn.model_dump(exclude_none=True)})
    return out


def namespaces(tools: list[dict] | None) -> set[str]:
    return {t.get("name") for t in tools or () if t.get("type") == "namespace"}


def _text_of(parts: str | list, param: str, allow_files: Sequence[Path], media: bool) -> str | list[dict]:
    if isinstance(parts, str):
        return parts
    out = []
    for j, p in enumerate(parts):
        where = f"{param}[{j}]"
        if isinstance(p, InputText):
            out.append({"type": "text", "text": p.text})
        elif isinstance(p, Refusal):
            out.append({"type": "text", "text": p.refusal})
        elif not media:
            raise APIError(400, f"{where}: only user messages may hold images or audio", where)
        elif isinstance(p, InputImage):
            if p.image_url is None:
                raise APIError(
                    400,
                    f"{where}.image_url: send the image as a data: URI (file_id uploads are not supported)",
                    f"{where}.image_url",
                )
            out.append(image_part(p.image_url, where, ".image_url", allow_files))
        else:
            out.append(audio_part(p.input_audio.data, where, ".input_audio.data"))
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def items_to_messages(
    items: list, allow_files: Sequence[Path], start: int = 0, escape: Callable[[str], str] = str
) -> list[dict]:
    """Responses input items as the processor's messages. Calls and reasoning join the assistant
    turn they belong to (Gemma's template writes calls, their results and the thought of a
    tool-calling turn inside one model turn); `start`: the index of the first item in errors;
    `escape`: the tokenizer's, for assistant text given back (answers never hold markup in
    `output_text`, so special-token text there must not come back as control tokens)."""
    out: list[dict] = []

    def assistant() -> dict:
        if out and out[-1]["role"] == "assistant":
            return out[-1]
        out.append({"role": "assistant", "content": ""})
        return out[-1]

    for i, item in enumerate(items, start):
        param = f"input[{i}]"
        if isinstance(item, MessageItem):
            content = _text_of(item.content, f"{param}.content", allow_files, item.role == "user")
            if item.role == "assistant":
                msg = assistant()
                if msg.get("tool_calls"):  # text after a call: a turn of its own
                    msg = {"role": "assistant", "content": ""}
                    out.append(msg)
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + escape(content)
            else:
                out.append({"role": item.role, "content": content})
        elif isinstance(item, FunctionCallItem):
            arguments = parse_arguments_json(item.arguments, f"{param}.arguments")
            name = f"{item.namespace}.{item.name}" if item.namespace else item.name
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
        elif isinstance(item, FunctionCallOutputItem):
            names = {c["id"]: c["function"]["name"] for m in out for c in m.get("tool_calls") or ()}
            if item.call_id not in names:
                raise APIError(
                    400,
                    f"{param}.call_id: no earlier function_call has call_id {item.call_id!r}",
                    f"{param}.call_id",
                    "invalid_value",
                )
            output = _text_of(item.output, f"{param}.output", allow_files, False)
            out.append(
                {"role": "tool", "tool_call_id": item.call_id, "name": names[item.call_id], "content": output}
            )
        else:  # reasoning: the thought of the assistant turn it starts
            text = "".join(c.text for c in item.content or []) or "".join(s.text for s in item.summary)
            msg = assistant()
            if text:
                msg["reasoning_content"] = (msg.get("reasoning_content", "") + text).strip()
    return out


def output_items(answer: Answer, ids: dict[str, str], status: str, spaces: set[str]) -> list[dict]:
    """The response's output items: reasoning, the message, the function calls."""
    items = []
    if answer.reasoning:
        items.append(reasoning_item(ids["reasoning"], answer.reasoning, "completed"))
    if answer.content or not answer.tool_calls:
        items.append(message_item(ids["message"], answer.content, status))
    items += [call_item(c, "completed", spaces) for c in answer.tool_calls]
    return items


def reasoning_item(rid: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": rid, "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(mid: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [output_text(text)]
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: Any, status: str, spaces: set[str], arguments: str | None = None) -> dict:
    """A function_call item; a call of NAMESPACE.NAME (a namespace's tool) names its namespace."""
    ns, _, name = call.name.partition(".")
    item = {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "call_id": call.id,
        "name": name if ns in spaces and name else call.name,
        "arguments": call.arguments_json() if arguments is None else arguments,
        "status": status,
    }
    if ns in spaces and name:
        item["namespace"] = ns
    return item


def response_usage(answer: Answer) -> dict:
    s = answer.stats
    prompt = s.prompt_tokens + s.cached_prompt_tokens
    reasoning = 0  # the parser does not count tokens per channel
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": s.cached_prompt_tokens, "cache_write_tokens": 0},
        "output_tokens": s.generation_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + s.generation_tokens,
    }


# --- the store ----------------------------------------------------------------------------------


class ResponseStore:
    """Stored responses, bounded by count and bytes (least recently used go first). Each keeps
    its response object and the conversation's items up to and including its output, so a
    request naming it as `previous_response_id` continues from there. Each entry belongs to the
    API-key partition that made it (`Front.authorize`): another key's clients get a 404, as for an
    id never stored."""

    def __init__(self, max_items: int = STORE_RESPONSES, max_bytes: int = STORE_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[str, tuple[dict, list[dict], int, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, response: dict, items: list[dict], partition: str = "") -> None:
        size = len(json.dumps(response)) + len(json.dumps(items))
        with self._lock:
            self._drop(response["id"])
            if size > self.max_bytes or self.max_items == 0:
                return
            self._entries[response["id"]] = (response, items, size, partition)
            self._bytes += size
            while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def get(self, rid: str, partition: str = "") -> tuple[dict, list[dict]]:
        with self._lock:
            entry = self._entries.get(rid)
            if entry is None or entry[3] != partition:
                raise APIError(
                    404,
                    f"response {rid!r} not found (never stored, deleted, or evicted from this server's "
                    f"store of {self.max_items} responses)",
                    "previous_response_id",
                    "response_not_found",
                )
            self._entries.move_to_end(rid)
            return entry[0], entry[1]

    def delete(self, rid: str, partition: str = "") -> bool:
        with self._lock:
            entry = self._entries.get(rid)
            return entry is not None and entry[3] == partition and self._drop(rid)

    def _drop(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is not None:
            self._bytes -= entry[2]
        return entry is not None


# --- routes -------------------------------------------------------------------------------------


def router(
    engine: Engine, front: Front, store: ResponseStore, escape: Callable[[str], str] = str
) -> APIRouter:
    """The routes; `escape`: the tokenizer's, for assistant text given back in `input`."""
    api = APIRouter()

    def input_items(req: ResponsesRequest, history: list[dict]) -> list[dict]:
        """The conversation's items (for the store) as JSON: the history's, then the request's."""
        new = (
            [{"type": "message", "role": "user", "content": req.input}]
            if isinstance(req.input, str)
            else [item.model_dump(exclude_none=True) for item in req.input]
        )
        if not history and not new:
            raise APIError(400, "input: is required (a string or a list of items)", "input")
        return history + new

    def conversation(req: ResponsesRequest, items: list[dict], history: int) -> Conversation:
        """The request as the shared conversation (`history`: how many items came from the store)."""
        parsed = ResponsesRequest.model_validate({"model": req.model, "input": items}).input
        messages = items_to_messages(parsed, engine.allow_files, start=-history, escape=escape)
        if req.instructions:
            messages.insert(0, {"role": "system", "content": req.instructions})
        messages = leading_system(messages)
        choice = req.tool_choice
        effort = req.reasoning.effort if req.reasoning else None
        fmt = req.text.format if req.text else None
        conv = Conversation(
            messages,
            tools=_tools(req.tools),
            tool_choice=choice if choice is None or isinstance(choice, str) else {"name": choice.name},
            parallel_tool_calls=req.parallel_tool_calls is not False,
            thinking=effort not in (None, "none", "minimal"),
            max_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            response_format=fmt,
            messages_param="input",
            limit_param="max_output_tokens",
            format_param="text.format",
            thinking_param="reasoning.effort",
        )
        return conv

    def response_object(req: ResponsesRequest, rid: str, now: float, status: str, output: list[dict]) -> dict:
        return {
            "id": rid,
            "object": "response",
            "created_at": now,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "tool_choice": req.tool_choice.model_dump()
            if isinstance(req.tool_choice, BaseModel)
            else (req.tool_choice or "auto"),
            "tools": req.tools or [],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def finished(
        resp: dict,
        answer: Answer,
        output: list[dict],
        items: list[dict],
        req: ResponsesRequest,
        partition: str,
    ) -> dict:
        if answer.finish_reason == "length":
            resp.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        elif answer.finish_reason == "cancelled":
            resp.update(status="cancelled")
        else:
            resp["status"] = "completed"
        resp.update(output=output, usage=response_usage(answer))
        if req.store:
            store.put(resp, items + [_as_input(o) for o in output], partition)
        return resp

    @api.post("/v1/responses")
    async def create(request: Request):
        partition = front.authorize(request)
        req: ResponsesRequest = front.parse(ResponsesRequest, await front.read_json(request))
        history = store.get(req.previous_response_id, partition)[1] if req.previous_response_id else []
        items = input_items(req, history)
        conv, prompt, job = await engine.start(lambda: conversation(req, items, len(history)), partition)
        rid, now = new_id("resp_"), time.time()
        ids = {"reasoning": new_id("rs_"), "message": new_id("msg_")}
        if req.stream:
            events = stream(req, job, prompt, conv, rid, now, ids, items, partition)
            return sse(job, _numbered(events), typed_event)
        answer = await engine.answer(request, job, prompt, conv)
        status = "incomplete" if answer.finish_reason == "length" else "completed"
        output = output_items(answer, ids, status, namespaces(req.tools))
        resp = response_object(req, rid, now, "in_progress", [])
        return finished(resp, answer, output, items, req, partition)

    async def stream(
        req: ResponsesRequest,
        job: Any,
        prompt: Prompt,
        conv: Conversation,
        rid: str,
        now: float,
        ids: dict[str, str],
        items: list[dict],
        partition: str,
    ) -> AsyncIterator[dict]:
        resp = response_object(req, rid, now, "in_progress", [])
        spaces = namespaces(req.tools)
        yield {"type": "response.created", "response": resp}
        yield {"type": "response.in_progress", "response": resp}
        output: list[dict] = []
        open_kind, text = None, ""

        def close(status: str = "completed") -> list[dict]:
            """The events that end the open reasoning or message item."""
            if open_kind is None:
                return []
            index = len(output)
            if open_kind == "reasoning":
                item, part = (
                    reasoning_item(ids["reasoning"], text, "completed"),
                    {"type": "reasoning_text", "text": text},
                )
                done = {"type": "response.reasoning_text.done", "text": text}
            else:
                item, part = message_item(ids["message"], text, status), output_text(text)
                done = {"type": "response.output_text.done", "text": text, "logprobs": []}
            at = {"item_id": item["id"], "output_index": index}
            output.append(item)
            return [
                {**done, **at, "content_index": 0},
                {"type": "response.content_part.done", **at, "content_index": 0, "part": part},
                {"type": "response.output_item.done", "output_index": index, "item": item},
            ]

        def opening(kind: str) -> list[dict]:
            index = len(output)
            if kind == "reasoning":
                item, part = (
                    reasoning_item(ids["reasoning"], None, "in_progress"),
                    {"type": "reasoning_text", "text": ""},
                )
            else:
                item, part = message_item(ids["message"], None, "in_progress"), output_text("")
            return [
                {"type": "response.output_item.added", "output_index": index, "item": item},
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                },
            ]

        try:
            async for d in engine.deltas(job, prompt, conv):
                if isinstance(d, Answer):
                    if (
                        not any(o["type"] == "message" for o in output)
                        and open_kind != "message"
                        and not d.tool_calls
                    ):
                        for e in close():
                            yield e
                        open_kind, text = "message", ""
                        for e in opening("message"):
                            yield e
                    for e in close("incomplete" if d.finish_reason == "length" else "completed"):
                        yield e
                    open_kind = None
                    final = finished(resp, d, output, items, req, partition)
                    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
                        final["status"], "response.failed"
                    )
                    yield {"type": kind, "response": final}
                    return
                kind = "message" if d.kind == "content" else d.kind
                if kind != open_kind:
                    for e in close():
                        yield e
                    open_kind, text = None, ""
                    if kind != "tool_call":
                        open_kind = kind
                        for e in opening(kind):
                            yield e
                if kind == "tool_call":
                    for e in call_events(d, len(output), spaces):
                        yield e
                    output.append(call_item(d.tool_call, "completed", spaces))
                    continue
                text += d.text
                at = {"item_id": ids[kind], "output_index": len(output), "content_index": 0}
                delta_type = (
                    "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                )
                yield {
                    "type": delta_type,
                    **at,
                    "delta": d.text,
                    **({} if kind == "reasoning" else {"logprobs": []}),
                }
        except Exception as e:  # noqa: BLE001 (a failure of ours, reported in the stream)
            resp.update(status="failed", error={"code": "server_error", "message": internal_error(e).message})
            yield {"type": "response.failed", "response": resp}

    @api.get("/v1/responses/{rid}")
    async def retrieve(rid: str, request: Request) -> dict:
        partition = front.authorize(request)
        return _not_found_as_path(lambda: store.get(rid, partition)[0])

    @api.delete("/v1/responses/{rid}")
    async def delete(rid: str, request: Request) -> dict:
        partition = front.authorize(request)
        if not store.delete(rid, partition):
            _not_found_as_path(lambda: store.get(rid, partition))
        return {"id": rid, "object": "response.deleted", "deleted": True}

    return api


def call_events(d: Delta, index: int, spaces: set[str]) -> list[dict]:
    call = d.tool_call
    pending, done = call_item(call, "in_progress", spaces, ""), call_item(call, "completed", spaces)
    at = {"item_id": done["id"], "output_index": index}
    return [
        {"type": "response.output_item.added", "output_index": index, "item": pending},
        {"type": "response.function_call_arguments.delta", **at, "delta": done["arguments"]},
        {
            "type": "response.function_call_arguments.done",
            **at,
            "name": call.name,
            "arguments": done["arguments"],
        },
        {"type": "response.output_item.done", "output_index": index, "item": done},
    ]


async def _numbered(events: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Each event with its `sequence_number`, in order."""
    n = 0
    try:
        async for e in events:
            yield {**e, "sequence_number": n}
            n += 1
    finally:
        await events.aclose()


def _as_input(item: dict) -> dict:
    """An output item as the input item a client would send back."""
    if item["type"] == "message":
        return {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": c["text"]} for c in item["content"]],
        }
    if item["type"] == "function_call":
        return {k: item[k] for k in ("type", "call_id", "name", "arguments", "namespace") if k in item}
    return {"type": "reasoning", "summary": [], "content": item["content"]}


def _not_found_as_path(get: Any) -> Any:
    try:
        return get()
    except APIError as e:
        e.param = None
        raise
