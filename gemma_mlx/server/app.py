"""The OpenAI-compatible HTTP app: routes, request checks, streaming, errors.

Requests are validated and their prompts prepared (template, media decoding, tokenizing) on the
event loop's thread pool, so a bad request is answered with a 4xx before it waits for the model;
the generation itself runs on the single `Worker` thread. Browser checks (Origin, Host, content
type) are the `guard` middleware's; the bounds on a request's work are in `limits`; running on
uvicorn with timeouts and signal handling is `serving`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..generate import GenerationResult, GenerationStats
from ..media import MediaError
from ..processor import Inputs, Processor
from ..prompt_cache import PromptKey
from ..tools import OutputParser
from . import limits
from .guard import Guard
from .messages import convert_messages
from .options import chat_logprobs, completion_logprobs, constraints_available, request_options
from .schema import APIError, ChatRequest, CompletionRequest, validation_error
from .webui import add_webui
from .worker import Job, QueueFull, Worker

log = logging.getLogger("gemma_mlx.server")

MAX_BODY_BYTES = 32 << 20  # room for a few base64 images or a 30 s WAV clip
MAX_QUEUE = 32
DEFAULT_MAX_TOKENS = 8192  # an answer's length when a request gives none (the context is the hard limit)
PREPARE_SLOTS = 2  # requests whose prompts are prepared (template, media, tokenizer) at once


def create_app(
    model: Any,
    processor: Processor,
    *,
    model_id: str,
    drafter: Any = None,
    draft_block_size: int = 4,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    api_key: str | None = None,
    allow_files: Sequence[str | Path] = (),
    cache_gb: float = 4.0,
    max_queue: int = MAX_QUEUE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_soft_tokens: int = 280,
    ui: bool = True,
    api_keys: Sequence[str] = (),
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    allow_origins: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    prepare_slots: int = PREPARE_SLOTS,
) -> FastAPI:
    """The server for one loaded model. `kv_bits`: quantized KV caches (see `make_cache`);
    `api_key`: required as a bearer token when set; `allow_files`: directories whose files may be
    sent as image paths; `cache_gb`: bound of the prefix cache; `max_queue`: requests that may
    wait for the model (beyond: 429); `max_body_bytes`: largest request body (beyond: 413).
    `api_keys`: more accepted keys (each key's clients get their own prefix-cache entries);
    `default_max_tokens`: an answer's length when a request sets none; `allow_origins` /
    `allow_hosts`: browser origins and Host names accepted beside the server's own (see `guard`);
    `prepare_slots`: requests prepared at once (others wait, counted against `max_queue`); `ui`: serve
    the chat page at `/`."""
    keys = ([api_key] if api_key is not None else []) + list(api_keys)
    if any(not k for k in keys):
        raise ValueError("an API key must not be empty")
    worker = Worker(
        model,
        processor,
        drafter=drafter,
        draft_block_size=draft_block_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        cache_bytes=int(cache_gb * (1 << 30)),
        max_queue=max_queue,
    )
    roots = [Path(d).expanduser().resolve() for d in allow_files]
    context = model.config.text.max_position_embeddings
    created = int(time.time())
    gate = limits.PrepareGate(prepare_slots, max_queue)
    longest: list[int] = []  # the vocabulary's longest token, measured on first use

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="gemma-mlx", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, allow_origins=allow_origins, allow_hosts=allow_hosts)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(
            APIError(e.status_code, str(e.detail), None, code).body(), status_code=e.status_code
        )

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # never sent: the connection is closed

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(internal_error(e).body(), status_code=500)

    def envelope(rid: str, kind: str, now: int) -> dict:
        """The fields every OpenAI response object and chunk starts with."""
        return {"id": rid, "object": kind, "created": now, "model": model_id}

    def authorize(request: Request) -> str:
        """Check the bearer key; returns the prefix-cache partition of its clients ("" without keys)."""
        if not keys:
            return ""
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key")
        # every key is compared (constant time each), so timing tells nothing about which matched
        hits = [secrets.compare_digest(given.encode(), k.encode()) for k in keys]
        if not any(hits):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")
        return str(hits.index(True))

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", None, "request_too_large")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > max_body_bytes:
                    raise APIError(
                        413, f"request body over {max_body_bytes} bytes", None, "request_too_large"
                    )
        except ClientDisconnect:  # closed while sending (or by the read timeout)
            raise ClientGone from None
        return limits.parse_body(bytes(body))

    def parse(cls: type, body: Any) -> Any:
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", None, "invalid_value")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != model_id:
            raise APIError(
                404,
                f"model {req.model!r} does not exist (this server has {model_id!r})",
                "model",
                "model_not_found",
            )
        return req

    def sampling(req: Any, prompt_tokens: int) -> dict:
        if prompt_tokens >= context:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context is {context} tokens",
                "messages" if isinstance(req, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        limit = req.limit
        if limit is not None and limit > context:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{name}={limit}: more than the model's context ({context} tokens)", name)
        gen = processor.generation_config
        greedy_default = not gen.get("do_sample", False)
        return {
            "max_tokens": min(limit or default_max_tokens or context, context - prompt_tokens),
            "temperature": req.temperature
            if req.temperature is not None
            else (0.0 if greedy_default else float(gen.get("temperature", 1.0))),
            "top_p": req.top_p if req.top_p is not None else float(gen.get("top_p", 1.0)),
            "top_k": req.top_k if req.top_k is not None else int(gen.get("top_k", 0)),
            "min_p": req.min_p or 0.0,
            "seed": req.seed,
            "stop": req.stops(),
        }

    def key_of(inputs: Inputs) -> PromptKey:
        cfg = model.config
        return PromptKey.of(
            inputs,
            getattr(cfg, "image_token_id", None),
            getattr(cfg, "audio_token_id", None),
            getattr(cfg, "video_token_id", None),
        )

    async def submit(inputs: Inputs, kwargs: dict, partition: str = "") -> Job:
        key = await asyncio.to_thread(key_of, inputs)
        key.partition = partition
        job = Job(inputs, key, kwargs, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(
                429,
                f"the server is busy ({max_queue} requests waiting); retry later",
                None,
                "queue_full",
                "rate_limit_error",
            ) from None
        return job

    async def collect(request: Request, job: Job, markup: bool = False) -> tuple[list[str], GenerationResult]:
        """All text of a job (`markup`: as the output parser reads it), cancelling it when the
        client goes away first."""

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def run() -> tuple[list[str], GenerationResult]:
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
        if not main.done() or main.cancelled():  # the client left: nobody reads an answer
            raise ClientGone
        return main.result()

    # --- routes --------------------------------------------------------------------------------

    if ui:
        add_webui(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict:
        authorize(request)
        if name != model_id:
            raise APIError(404, f"model {name!r} does not exist", "model", "model_not_found")
        return model_card()

    def model_card() -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "gemma-mlx",
            "context_length": context,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        partition = authorize(request)
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        async with gate.enter():  # the grammar compiles here too
            prompt = await asyncio.to_thread(prepare_chat, req)
            kwargs = sampling(req, len(prompt.inputs.ids))
            kwargs.update(await asyncio.to_thread(request_options, req, prompt.inputs, processor, context))
        job = await submit(prompt.inputs, kwargs, partition)
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        parser = make_parser(req.thinking, prompt.forced, [t.function.name for t in req.tools or []])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(job, stream_chat(job, parser, rid, now, include_usage))
        texts, result = await collect(request, job, markup=True)
        deltas = [d for t in texts for d in parser.feed(t)] + parser.finish()
        content = "".join(d.text for d in deltas if d.kind == "content")
        reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
        calls = [d.tool_call for d in deltas if d.kind == "tool_call"]
        message: dict = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        finish = "tool_calls" if calls else result.finish_reason
        lps = chat_logprobs(result, processor) if req.logprobs else None
        return {
            **envelope(rid, "chat.completion", now),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": lps}],
            "usage": usage(result.stats),
            "timings": timings(result.stats),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        partition = authorize(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        async with gate.enter():  # the grammar compiles here too
            inputs = await asyncio.to_thread(prepare_text, req)
            kwargs = sampling(req, len(inputs.ids))
            kwargs.update(await asyncio.to_thread(request_options, req, inputs, processor, context))
        job = await submit(inputs, kwargs, partition)
        rid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(job, stream_text(job, rid, now, include_usage))
        texts, result = await collect(request, job)
        return {
            **envelope(rid, "text_completion", now),
            "choices": [
                {
                    "index": 0,
                    "text": "".join(texts),
                    "finish_reason": result.finish_reason,
                    "logprobs": completion_logprobs(result, processor) if req.logprobs is not None else None,
                }
            ],
            "usage": usage(result.stats),
            "timings": timings(result.stats),
        }

    # --- prompts -------------------------------------------------------------------------------

    def check_length(chars: int, param: str) -> None:
        if not longest:
            longest.append(limits.longest_token(processor))
        limits.check_chars(chars, longest[0], context, param)

    def prepare_chat(req: ChatRequest) -> ChatPrompt:
        limits.check_capabilities(model, processor, req, req.thinking_param)
        check_length(limits.text_chars(req), "messages")
        messages = convert_messages(req.messages, roots, processor.tokenizer.escape)
        tools, forced = tool_setup(req)
        extra = {"tools": tools} if tools else {}
        try:
            text = processor.apply_chat_template(messages, enable_thinking=req.thinking, **extra) + forced
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        except Exception as e:  # the template's own raise_exception (jinja) for unsupported shapes
            if type(e).__module__.startswith("jinja2"):
                raise APIError(400, f"messages: {e}", "messages") from None
            raise
        images = [
            p["image"]
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image"
        ]
        audio = [
            (p["audio"], p["sampling_rate"])
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "audio"
        ]
        videos = [
            p["video"]
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "video"
        ]
        limits.check_text(processor, text, context, "messages")
        try:
            inputs = processor.prepare(
                text,
                images,
                audio,
                videos=videos,
                add_bos=False,
                max_soft_tokens=max_soft_tokens,
                token_budget=context,
            )
        except MediaError as e:
            raise APIError(400, f"messages: {e}", "messages", "invalid_value") from None
        return ChatPrompt(inputs, forced)

    def tool_setup(req: ChatRequest) -> tuple[list[dict] | None, str]:
        """Tools for the template, and the start of a call written after the generation prompt
        when one is required (`required`, or a named function)."""
        choice = req.tool_choice
        if not req.tools or choice == "none":
            if choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice: names a tool but no tools were given", "tool_choice")
            return None, ""
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        if choice is not None and constraints_available():
            names = [t.function.name for t in req.tools]
            if not isinstance(choice, str) and choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice: {choice.function.name!r} is not one of the tools {names}",
                    "tool_choice",
                )
            return tools, ""  # the call grammar forces the call (after any thought)
        if choice == "required":
            return tools, "<|tool_call>call:"
        if choice is not None and choice not in ("auto",):
            names = [t.function.name for t in req.tools]
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice: {choice.function.name!r} is not one of the tools {names}",
                    "tool_choice",
                )
            return tools, f"<|tool_call>call:{choice.function.name}" + "{"
        return tools, ""

    def prepare_text(req: CompletionRequest) -> Inputs:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (n = 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and any(not 0 <= i < model.config.text.vocab_size for i in prompt):
            raise APIError(400, "prompt: token ids must be within the vocabulary", "prompt")
        if isinstance(prompt, str):
            check_length(len(prompt), "prompt")
            limits.check_text(processor, prompt, context, "prompt")
        try:
            return processor.prepare(prompt)
        except ValueError as e:  # an empty prompt ([""]) and the like
            raise APIError(400, f"prompt: {e}", "prompt", "invalid_value") from None

    # --- streaming -----------------------------------------------------------------------------

    def chunk(rid: str, now: int, delta: dict, finish: str | None = None) -> dict:
        return {
            **envelope(rid, "chat.completion.chunk", now),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    async def stream_chat(
        job: Job, parser: Any, rid: str, now: int, include_usage: bool
    ) -> AsyncIterator[dict]:
        yield chunk(rid, now, {"role": "assistant", "content": ""})
        calls = 0
        result = None
        async for ev in job.stream():
            if ev.error is not None:
                yield internal_error(ev.error).body()
                return
            deltas = parser.feed(ev.markup) if not ev.done else parser.finish()
            for d in deltas:
                if d.kind == "content":
                    yield chunk(rid, now, {"content": d.text})
                elif d.kind == "reasoning":
                    yield chunk(rid, now, {"reasoning_content": d.text})
                else:
                    yield chunk(rid, now, {"tool_calls": [{"index": calls, **tool_call_json(d.tool_call)}]})
                    calls += 1
            result = ev.result
        finish = "tool_calls" if calls else result.finish_reason
        for c in closing(chunk(rid, now, {}, finish), result.stats, include_usage):
            yield c

    async def stream_text(job: Job, rid: str, now: int, include_usage: bool) -> AsyncIterator[dict]:
        def text_chunk(text: str, finish: str | None = None) -> dict:
            return {
                **envelope(rid, "text_completion", now),
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        result = None
        async for ev in job.stream():
            if ev.error is not None:
                yield internal_error(ev.error).body()
                return
            if ev.text:
                yield text_chunk(ev.text)
            result = ev.result
        for c in closing(text_chunk("", result.finish_reason), result.stats, include_usage):
            yield c

    def closing(last: dict, stats: GenerationStats, include_usage: bool) -> list[dict]:
        """A stream's last chunk with the timings, and the usage chunk when the client asked."""
        tail = [{**last, "timings": timings(stats)}]
        if include_usage:
            head = envelope(last["id"], last["object"], last["created"])
            tail.append({**head, "choices": [], "usage": usage(stats)})
        return tail

    def sse(job: Job, events: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: Starlette cancels this task then
                job.cancel()
                await events.aclose()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def make_parser(thinking: bool, forced: str = "", tools: Sequence[str] = ()) -> OutputParser:
    """A streaming parser of one answer; `forced` is text written after the generation prompt
    (the start of a required tool call), which it reads before the model's own output; calls of
    functions not in `tools` (the request's declared names) stay text."""
    parser = OutputParser(thinking=thinking, tools=tools)
    if forced:
        parser.feed(forced)
    return parser


class ChatPrompt:
    def __init__(self, inputs: Inputs, forced: str) -> None:
        self.inputs, self.forced = inputs, forced


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def internal_error(e: BaseException) -> APIError:
    """A failure of ours (500), as an OpenAI error object; the server keeps serving. The message
    names the exception's type only (its text may hold server paths); the log has the traceback."""
    log.error("internal error", exc_info=e)
    return APIError(
        500, f"internal error ({type(e).__name__}); see the server log", None, None, "server_error"
    )


def usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens + stats.cached_prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.cached_prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
    }


def timings(stats: GenerationStats) -> dict:
    """The extension field: speeds and speculative decoding's acceptance."""
    return {
        "prompt_tokens_per_second": round(stats.prompt_tps, 2),
        "generation_tokens_per_second": round(stats.generation_tps, 2),
        "draft_tokens": stats.drafted,
        "accepted_draft_tokens": stats.accepted,
        "draft_acceptance": None if stats.acceptance is None else round(stats.acceptance, 4),
    }


def tool_call_json(call: Any) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json()},
    }
