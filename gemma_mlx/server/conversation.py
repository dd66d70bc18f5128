"""The one conversation layer under every chat API (Chat Completions, Responses, Messages).

Each wire format converts its request into a `Conversation` (processor messages with media
decoded, tools, tool choice, thinking, sampling) and reads the model's answer back as the same
output events: the streaming parser's `Delta`s (content, reasoning, tool calls) and a final
`Answer` (with finish reason and stats). Prompt building, checks, queueing, cancellation and
server-sent events live here once; the API modules only translate JSON. So do the bounds on a
request's work (`limits`: capabilities, the prompt's length before tokenizing, the preparation gate,
the media budget) and the rules of the answer (markup read from the sampled token ids, calls of
undeclared tools kept as text, the default answer length, cancellation when the client leaves).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..generate import GenerationStats
from ..media import MediaBudget, MediaError
from ..processor import Inputs, Processor
from ..prompt_cache import PromptKey
from ..tools import Delta, OutputParser, ToolCall
from . import limits
from .messages import decode_media
from .options import constraint_options, constraints_available
from .schema import APIError
from .worker import Job, QueueFull, Worker

log = logging.getLogger("gemma_mlx.server")
DEFAULT_MAX_TOKENS = 8192  # an answer's length when a request gives none (the context is the hard limit)
PREPARE_SLOTS = 2  # requests whose prompts are prepared (template, media, tokenizer) at once


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def internal_error(e: BaseException) -> APIError:
    """A failure of ours (500), as an OpenAI error object; the server keeps serving. The message
    names the exception's type only (its text may hold server paths); the log has the traceback."""
    log.error("internal error", exc_info=e)
    return APIError(
        500, f"internal error ({type(e).__name__}); see the server log", None, None, "server_error"
    )


@dataclass
class Conversation:
    """A chat request, whatever API it came in: what the prompt and the sampler need.

    `messages` are the processor's (roles system/user/assistant/tool; images and audio as the
    undecoded parts of `messages.image_part`/`audio_part`, decoded by `Engine.prepare` within the
    request's media budget; assistant text escaped, `tool_calls` with object arguments and
    `reasoning_content`); `message_params` name each message in errors where the request's
    messages map one to one (Chat Completions), else errors name `messages_param`;
    `tools` are OpenAI function schemas; `tool_choice` is None, "auto", "none", "required" or a
    function name given as {"name": ...}. The `*_param` fields name the request's own fields in
    errors (`input` on Responses, `max_output_tokens` ...)."""

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    thinking: bool = False
    thinking_budget: int | None = None  # tokens the thought channel may take (then it is closed)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    response_format: dict | None = None  # {"type": "json_schema" | "json_object" | "text", ...}
    messages_param: str = "messages"
    limit_param: str = "max_tokens"
    tools_param: str = "tools"
    tool_choice_param: str = "tool_choice"
    format_param: str = "response_format"
    thinking_param: str = "reasoning_effort"
    message_params: list[str] | None = None
    # stream_generate keyword arguments only some APIs have (penalties, logit_bias, logprobs)
    options: dict = field(default_factory=dict)

    def tool_names(self) -> list[str]:
        """The declared functions' names: calls of any other stay text."""
        return [t["function"]["name"] for t in self.tools or ()]


@dataclass
class Prompt:
    inputs: Inputs
    forced: str  # text written after the generation prompt (the start of a required tool call)
    options: dict = field(default_factory=dict)  # the response format and tool-call constraint


@dataclass
class Answer:
    """The whole answer: visible text, thoughts, calls, and why it ended."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    stats: GenerationStats
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    logprobs: list = field(default_factory=list)  # `TokenLogprob`s, when the request asked


def leading_system(messages: list[dict]) -> list[dict]:
    """The system and developer messages that open a conversation joined into one system turn
    (agents send several; Gemma's templates take one system turn, written first); later developer
    messages are written as system messages."""
    head = 0
    while head < len(messages) and messages[head]["role"] in ("system", "developer"):
        head += 1
    texts = [m["content"] for m in messages[:head]]
    rest = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages[head:]]
    if head and all(isinstance(t, str) for t in texts):
        return [{"role": "system", "content": "\n\n".join(texts)}, *rest]
    return messages[:head] + rest


def check_tool_results(messages: Sequence[dict], param: str) -> None:
    """Every tool result must answer a call made earlier in the conversation."""
    known: set[str] = set()
    for i, m in enumerate(messages):
        known.update(c["id"] for c in m.get("tool_calls") or () if c.get("id"))
        call_id = m.get("tool_call_id")
        if m["role"] == "tool" and call_id and call_id not in known:
            raise APIError(
                400,
                f"{param}: the tool result in message {i} answers call id {call_id!r}, "
                "which no earlier assistant turn made",
                param,
                "invalid_value",
            )


def tool_setup(conv: Conversation) -> tuple[list[dict] | None, str]:
    """Tools for the template, and the start of a call written after the generation prompt
    when one is required (`required`, or a named function)."""
    choice, param = conv.tool_choice, conv.tool_choice_param
    if not conv.tools or choice == "none":
        if choice not in (None, "none", "auto"):
            raise APIError(400, f"{param}: names a tool but no tools were given", param)
        return None, ""
    if choice not in (None, "auto") and constraints_available():
        return conv.tools, ""  # the call grammar forces the call (after any thought)
    if choice == "required":
        return conv.tools, "<|tool_call>call:"
    if isinstance(choice, dict):
        names = [t["function"]["name"] for t in conv.tools]
        if choice["name"] not in names:
            raise APIError(400, f"{param}: {choice['name']!r} is not one of the tools {names}", param)
        return conv.tools, f"<|tool_call>call:{choice['name']}" + "{"
    return conv.tools, ""


def make_parser(thinking: bool, forced: str = "", tools: Sequence[str] = ()) -> OutputParser:
    """A streaming parser of one answer, fed the generation's markup (`GenerationChunk.markup`:
    markup only where special tokens were sampled); `forced` is text written after the generation
    prompt (the start of a required tool call), which it reads before the model's own output;
    calls of functions not in `tools` (the request's declared names) stay text."""
    parser = OutputParser(thinking=thinking, tools=tools)
    if forced:
        parser.feed(forced)
    return parser


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class Engine:
    """Prompts, sampling, the queue and cancellation, shared by all the chat APIs of one app; every
    bound on a request's work that does not depend on its wire format is checked here."""

    def __init__(
        self,
        model: Any,
        processor: Processor,
        worker: Worker,
        *,
        allow_files: Sequence[Path],
        max_soft_tokens: int,
        max_queue: int,
        default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
        prepare_slots: int = PREPARE_SLOTS,
    ) -> None:
        self.model, self.processor, self.worker = model, processor, worker
        self.allow_files = list(allow_files)
        self.max_soft_tokens, self.max_queue = max_soft_tokens, max_queue
        self.default_max_tokens = default_max_tokens
        self.context = model.config.text.max_position_embeddings
        self.gate = limits.PrepareGate(prepare_slots, max_queue)
        self._longest: int | None = None  # the vocabulary's longest token, measured on first use

    # --- the prompt ------------------------------------------------------------------------------

    def check_length(self, chars: int, param: str) -> None:
        """Refuse text of `chars` characters that cannot fit the context, before any tokenizing."""
        if self._longest is None:
            self._longest = limits.longest_token(self.processor)
        limits.check_chars(chars, self._longest, self.context, param)

    def prepare(self, conv: Conversation) -> Prompt:
        """The conversation's prompt: checked, templated, media decoded within the request's
        `MediaBudget` and encoded (runs in a thread, behind the gate)."""
        param = conv.messages_param
        limits.check_capabilities(self.model, self.processor, conv)
        options = constraint_options(conv, self.processor, self.model.config.text.vocab_size)
        check_tool_results(conv.messages, param)
        self.check_length(limits.text_chars(conv), param)
        tools, forced = tool_setup(conv)
        messages = decode_media(conv.messages, MediaBudget())
        extra = {"tools": tools} if tools else {}
        try:
            text = self.processor.apply_chat_template(messages, enable_thinking=conv.thinking, **extra)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        except Exception as e:  # the template's own raise_exception (jinja) for unsupported shapes
            if type(e).__module__.startswith("jinja2"):
                raise APIError(400, f"{param}: {e}", param) from None
            raise
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        images = [p["image"] for p in parts if p["type"] == "image"]
        audio = [(p["audio"], p["sampling_rate"]) for p in parts if p["type"] == "audio"]
        videos = [p["video"] for p in parts if p["type"] == "video"]
        limits.check_text(self.processor, text, self.context, param)
        try:
            inputs = self.processor.prepare(
                text + forced,
                images,
                audio,
                videos=videos,
                add_bos=False,
                max_soft_tokens=self.max_soft_tokens,
                token_budget=self.context,
            )
        except MediaError as e:
            raise APIError(400, f"{param}: {e}", param, "invalid_value") from None
        return Prompt(inputs, forced, options)

    def sampling(self, conv: Conversation, prompt_tokens: int) -> dict:
        """stream_generate's keyword arguments; the generation config gives the defaults."""
        context = self.context
        if prompt_tokens >= context:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context is {context} tokens",
                conv.messages_param,
                "context_length_exceeded",
            )
        limit = conv.max_tokens
        if limit is not None and limit > context:
            name = conv.limit_param
            raise APIError(400, f"{name}={limit}: more than the model's context ({context} tokens)", name)
        gen = self.processor.generation_config
        greedy_default = not gen.get("do_sample", False)
        return {
            "max_tokens": min(limit or self.default_max_tokens or context, context - prompt_tokens),
            "temperature": conv.temperature
            if conv.temperature is not None
            else (0.0 if greedy_default else float(gen.get("temperature", 1.0))),
            "top_p": conv.top_p if conv.top_p is not None else float(gen.get("top_p", 1.0)),
            "top_k": conv.top_k if conv.top_k is not None else int(gen.get("top_k", 0)),
            "min_p": conv.min_p or 0.0,
            "seed": conv.seed,
            "stop": list(conv.stop),
        }

    def kwargs(self, conv: Conversation, inputs: Inputs, prompt: Prompt | None = None) -> dict:
        """Everything the worker passes to `stream_generate` for this request."""
        kwargs = self.sampling(conv, len(inputs.ids))
        kwargs.update(prompt.options if prompt else {}, **conv.options)
        return kwargs

    # --- the queue -------------------------------------------------------------------------------

    def key_of(self, inputs: Inputs) -> PromptKey:
        cfg = self.model.config
        return PromptKey.of(
            inputs,
            getattr(cfg, "image_token_id", None),
            getattr(cfg, "audio_token_id", None),
            getattr(cfg, "video_token_id", None),
        )

    async def submit(
        self, inputs: Inputs, kwargs: dict, partition: str = "", thinking_budget: int | None = None
    ) -> Job:
        """Queue a prompt; `partition`: the prefix-cache partition of the client's API key;
        `thinking_budget`: tokens the thought channel may take (then the worker closes it)."""
        key = await asyncio.to_thread(self.key_of, inputs)
        key.partition = partition
        job = Job(inputs, key, kwargs, asyncio.get_running_loop(), thinking_budget=thinking_budget)
        try:
            self.worker.submit(job)
        except QueueFull:
            raise APIError(
                429,
                f"the server is busy ({self.max_queue} requests waiting); retry later",
                None,
                "queue_full",
                "rate_limit_error",
            ) from None
        return job

    async def prepared(self, work: Callable[[], Any]) -> Any:
        """Run a preparation step in a thread behind the gate (a few at once; the waiting ones
        count against `max_queue`)."""
        async with self.gate.enter():
            return await asyncio.to_thread(work)

    async def start(
        self, build: Callable[[], Conversation], partition: str = ""
    ) -> tuple[Conversation, Prompt, Job]:
        """Build the conversation (an API's conversion: base64 decoding, escaping) and prepare
        its prompt, both behind the gate (4xx before it waits), and queue it; `partition`: the
        prefix-cache partition of the client's key."""

        def work() -> tuple[Conversation, Prompt]:
            conv = build()
            return conv, self.prepare(conv)

        conv, prompt = await self.prepared(work)
        kwargs = self.kwargs(conv, prompt.inputs, prompt)
        budget = conv.thinking_budget if conv.thinking else None
        job = await self.submit(prompt.inputs, kwargs, partition, budget)
        return conv, prompt, job

    # --- the answer ------------------------------------------------------------------------------

    async def texts(self, request: Request, job: Job, markup: bool = False) -> tuple[list[str], Any]:
        """All text of a job (`markup`: as the output parser reads it), cancelling it when the
        client goes away first (then `ClientGone`: nobody reads an answer)."""

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def run() -> tuple[list[str], Any]:
            texts = []
            async for ev in job.stream():
                if ev.error is not None:
                    raise ev.error
                texts.append(ev.markup if markup else ev.text)
                if ev.done:
                    return texts, ev.result
            raise RuntimeError("the job ended without a result")

        watcher, main = asyncio.ensure_future(gone()), asyncio.ensure_future(run())
        try:
            await asyncio.wait({watcher, main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not main.done():
                job.cancel()
                main.cancel()
        if not main.done() or main.cancelled():
            raise ClientGone
        return main.result()

    async def answer(self, request: Request, job: Job, prompt: Prompt, conv: Conversation) -> Answer:
        """The whole answer of a non-streaming request."""
        texts, result = await self.texts(request, job, markup=True)
        parser = make_parser(conv.thinking, prompt.forced, conv.tool_names())
        deltas = [d for t in texts for d in parser.feed(t)] + parser.finish()
        return self._answer(deltas, result, conv)

    async def deltas(self, job: Job, prompt: Prompt, conv: Conversation) -> AsyncIterator[Delta | Answer]:
        """The answer as it is generated: `Delta`s, then the `Answer` (errors are raised)."""
        parser = make_parser(conv.thinking, prompt.forced, conv.tool_names())
        seen: list[Delta] = []
        async for ev in job.stream():
            if ev.error is not None:
                raise ev.error
            for d in parser.feed(ev.markup) if not ev.done else parser.finish():
                if d.kind == "tool_call" and not conv.parallel_tool_calls and _calls(seen):
                    continue  # one call per turn was asked for: later ones are dropped
                seen.append(d)
                yield d
            if ev.done:
                yield self._answer(seen, ev.result, conv)
                return

    def _answer(self, deltas: list[Delta], result: Any, conv: Conversation) -> Answer:
        calls = _calls(deltas)
        if not conv.parallel_tool_calls:
            calls = calls[:1]
        finish = "tool_calls" if calls else result.finish_reason
        stop_sequence = None
        if finish == "stop" and conv.stop and result.tokens:
            if result.tokens[-1] not in self.processor.eos_token_ids:
                text = self.processor.tokenizer.decode(result.tokens)
                hits = [(text.find(s), s) for s in conv.stop if s in text]
                stop_sequence = min(hits)[1] if hits else None
        return Answer(
            content="".join(d.text for d in deltas if d.kind == "content"),
            reasoning="".join(d.text for d in deltas if d.kind == "reasoning"),
            tool_calls=calls,
            finish_reason=finish,
            stats=result.stats,
            stop_sequence=stop_sequence,
            logprobs=list(result.logprobs),
        )


def _calls(deltas: Sequence[Delta]) -> list[ToolCall]:
    return [d.tool_call for d in deltas if d.kind == "tool_call"]


def sse(
    job: Job, events: AsyncIterator[dict], encode: Callable[[dict], str], last: str = ""
) -> StreamingResponse:
    """Server-sent events of a job; the job is cancelled when the stream ends early (the client
    went away: Starlette cancels the body's task then). `encode` writes one event; `last` ends
    the stream (Chat Completions' "data: [DONE]")."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield encode(event)
            if last:
                yield last
        finally:
            job.cancel()
            await events.aclose()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def data_line(event: dict) -> str:
    """`data: {...}`: Chat Completions' events."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def typed_event(event: dict) -> str:
    """`event: TYPE` + `data: {...}`: the Responses and Messages APIs' events."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
