"""The HTTP app: routes of the OpenAI-compatible API (and, from their modules, the Responses and
Anthropic Messages APIs), error shapes, streaming.

Requests are validated and their prompts prepared (template, media decoding, tokenizing) on the
event loop's thread pool, so a bad request is answered with a 4xx before it waits for the model;
the generation itself runs on the single `Worker` thread. Browser checks (Origin, Host, content
type) are the `guard` middleware's; the bounds on a request's work are in `limits`, applied to every
chat API by the shared `conversation` layer; running on uvicorn with timeouts and signal handling is
`serving`'s.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import GenerationStats
from ..processor import Inputs, Processor
from . import anthropic, limits, responses
from .conversation import (
    DEFAULT_MAX_TOKENS,
    PREPARE_SLOTS,
    Answer,
    ClientGone,
    Conversation,
    Engine,
    Prompt,
    data_line,
    internal_error,
    sse,
)
from .front import Front
from .guard import Guard
from .messages import convert_messages
from .options import chat_logprobs, completion_logprobs, sampler_options
from .responses import STORE_BYTES, STORE_RESPONSES, ResponseStore
from .schema import APIError, ChatRequest, CompletionRequest
from .webui import add_webui
from .worker import Job, Worker, serving_concurrency

__all__ = ["ClientGone", "create_app", "internal_error"]

DONE = "data: [DONE]\n\n"
MAX_BODY_BYTES = 32 << 20  # room for a few base64 images or a 30 s WAV clip
MAX_QUEUE = 32


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
    max_concurrency: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_soft_tokens: int = 280,
    model_aliases: Sequence[str] = (),
    any_model: bool = False,
    store_responses: int = STORE_RESPONSES,
    store_bytes: int = STORE_BYTES,
    ui: bool = True,
    api_keys: Sequence[str] = (),
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    allow_origins: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    prepare_slots: int = PREPARE_SLOTS,
) -> FastAPI:
    """The server for one loaded model. `kv_bits`: quantized KV caches (see `make_cache`);
    `api_key`: required as a bearer token (or `x-api-key`) when set; `allow_files`: directories
    whose files may be sent as image paths; `cache_gb`: bound of the prefix cache; `max_queue`:
    requests that may wait for the model (beyond: 429); `max_concurrency`: requests decoded
    together (None: from the memory available and a request's KV cache, see
    `footprint.default_concurrency`; a pipeline over several ranks decodes one);
    `max_body_bytes`: largest request body (beyond: 413); `model_aliases`: more names the model
    answers to; `any_model`: answer any name; `store_responses`/`store_bytes`: bounds of the
    Responses API's stored responses (LRU).
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
        max_concurrency=serving_concurrency(model, kv_bits, kv_group_size, max_concurrency),
    )
    roots = [Path(d).expanduser().resolve() for d in allow_files]
    engine = Engine(
        model,
        processor,
        worker,
        allow_files=roots,
        max_soft_tokens=max_soft_tokens,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        prepare_slots=prepare_slots,
    )
    model_ids = list(dict.fromkeys([model_id, *model_aliases]))
    front = Front(model_ids=model_ids, any_model=any_model, keys=keys, max_body_bytes=max_body_bytes)
    context = engine.context
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="gemma-mlx", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(
        Guard, allow_origins=allow_origins, allow_hosts=allow_hosts, error_body=anthropic.guard_error_body
    )

    def error_response(request: Request, e: APIError) -> JSONResponse:
        """Each API's own error shape (Anthropic's under /v1/messages, OpenAI's elsewhere)."""
        if request.url.path.startswith("/v1/messages"):
            return JSONResponse(anthropic.error_body(e), status_code=e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(request, APIError(e.status_code, str(e.detail), None, code))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # never sent: the connection is closed

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return error_response(request, internal_error(e))

    def envelope(rid: str, kind: str, now: int) -> dict:
        """The fields every OpenAI response object and chunk starts with."""
        return {"id": rid, "object": kind, "created": now, "model": model_id}

    authorize, read_json, parse = front.authorize, front.read_json, front.parse

    # --- routes --------------------------------------------------------------------------------

    if ui:
        add_webui(app)

    # like /health, /metrics needs no API key (as vLLM's and llama-server's): it shows counts and
    # timings of all clients together, never a prompt; the guard's Host and Origin checks still apply
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **worker.metrics.snapshot()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = worker.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card(m) for m in model_ids]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict:
        authorize(request)
        if not front.serves(name):
            raise APIError(404, f"model {name!r} does not exist", "model", "model_not_found")
        return model_card(name)

    def model_card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "gemma-mlx",
            "context_length": context,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        partition = authorize(request)
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        conv, prompt, job = await engine.start(
            lambda: chat_conversation(req, roots, processor.tokenizer.escape), partition
        )
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(job, stream_chat(job, prompt, conv, rid, now, include_usage), data_line, DONE)
        answer = await engine.answer(request, job, prompt, conv)
        message: dict = {
            "role": "assistant",
            "content": answer.content if answer.content or not answer.tool_calls else None,
        }
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if answer.tool_calls:
            message["tool_calls"] = [tool_call_json(c) for c in answer.tool_calls]
        return {
            **envelope(rid, "chat.completion", now),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": answer.finish_reason,
                    "logprobs": chat_logprobs(answer.logprobs, processor) if req.logprobs else None,
                }
            ],
            "usage": usage(answer.stats),
            "timings": timings(answer.stats),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        partition = authorize(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        inputs = await engine.prepared(lambda: prepare_text(req))
        conv = Conversation(
            [],
            max_tokens=req.limit,
            **req.sampler_fields(),
            messages_param="prompt",
            options=sampler_options(req),
        )
        job = await engine.submit(inputs, engine.kwargs(conv, inputs), partition)
        rid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(job, stream_text(job, rid, now, include_usage), data_line, DONE)
        texts, result = await engine.texts(request, job)
        return {
            **envelope(rid, "text_completion", now),
            "choices": [
                {
                    "index": 0,
                    "text": "".join(texts),
                    "finish_reason": result.finish_reason,
                    "logprobs": None
                    if req.logprobs is None
                    else completion_logprobs(result.logprobs, processor),
                }
            ],
            "usage": usage(result.stats),
            "timings": timings(result.stats),
        }

    app.include_router(
        responses.router(
            engine, front, ResponseStore(store_responses, store_bytes), processor.tokenizer.escape
        )
    )
    app.include_router(anthropic.router(engine, front, processor.tokenizer.escape))

    # --- prompts -------------------------------------------------------------------------------

    def prepare_text(req: CompletionRequest) -> Inputs:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (n = 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and any(not 0 <= i < model.config.text.vocab_size for i in prompt):
            raise APIError(400, "prompt: token ids must be within the vocabulary", "prompt")
        if isinstance(prompt, str):
            engine.check_length(len(prompt), "prompt")
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
        job: Job, prompt: Prompt, conv: Conversation, rid: str, now: int, include_usage: bool
    ) -> AsyncIterator[dict]:
        yield chunk(rid, now, {"role": "assistant", "content": ""})
        calls = 0
        try:
            async for d in engine.deltas(job, prompt, conv):
                if isinstance(d, Answer):
                    for c in closing(chunk(rid, now, {}, d.finish_reason), d.stats, include_usage):
                        yield c
                elif d.kind == "content":
                    yield chunk(rid, now, {"content": d.text})
                elif d.kind == "reasoning":
                    yield chunk(rid, now, {"reasoning_content": d.text})
                else:
                    yield chunk(rid, now, {"tool_calls": [{"index": calls, **tool_call_json(d.tool_call)}]})
                    calls += 1
        except Exception as e:  # noqa: BLE001 (a failure of ours, reported in the stream)
            yield internal_error(e).body()

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

    return app


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


def chat_conversation(
    req: ChatRequest, allow_files: Sequence[Path], escape: Callable[[str], str] = str
) -> Conversation:
    """A Chat Completions request as the shared conversation (base64 decoded: run in a thread);
    `escape`: the tokenizer's, for assistant text given back."""
    choice = req.tool_choice
    return Conversation(
        convert_messages(req.messages, allow_files, escape),
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice=choice if choice is None or isinstance(choice, str) else {"name": choice.function.name},
        parallel_tool_calls=req.parallel_tool_calls is not False,
        thinking=req.thinking,
        max_tokens=req.limit,
        **req.sampler_fields(),
        response_format=req.response_format,
        options=sampler_options(req),
        limit_param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
        thinking_param=req.thinking_param,
        message_params=[f"messages[{i}]" for i in range(len(req.messages))],
    )


def tool_call_json(call: Any) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json()},
    }
