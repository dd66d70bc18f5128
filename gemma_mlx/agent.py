"""Tools from MCP servers for a chat session: connect, declare, ask, run, give the results back.

`MCPTools` connects to Model Context Protocol servers (stdio commands and streamable-HTTP URLs)
with the official `mcp` SDK (extra: agent), lists their tools and calls them. The SDK is asyncio
while MLX must be driven from one thread: the clients live on an event loop in a background
thread, and the model stays on the caller's thread, which waits for each call with a timeout.

`Agent` runs the loop on a `ChatSession`: an answer with tool calls -> each call checked (known
tool, arguments valid against its JSON schema), the user's consent asked, run with a timeout ->
the results given back (text; images as images, after the results, since Gemma's tool responses
hold text) -> the next answer, until an answer calls nothing or the per-turn limit is reached.
Every failure (a tool error, a timeout, a server that exited or never started, an unknown tool,
arguments failing the schema, a refusal) becomes the call's result, for the model to read, and a
`notice` for the user; nothing raises except Ctrl-C (KeyboardInterrupt), which stops the turn and
keeps the session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin one before 3.11
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .chat import ChatSession
from .tools import OutputParser, ToolCall

EXTRA_HINT = "pip install 'gemma-mlx[agent]'"
LAUNCHERS = {"python", "python3", "node", "npx", "uv", "uvx", "deno", "bun", "bunx", "docker", "pipx", "sh"}
MAX_RESULT_CHARS = 16_000  # a longer tool output is cut: one file read must not fill the context


class MCPUnavailable(RuntimeError):
    """The `mcp` SDK is not installed."""


def require_sdk():
    try:
        import mcp
    except ImportError:
        raise MCPUnavailable(f"MCP servers need the MCP SDK: {EXTRA_HINT}") from None
    return mcp


@dataclass
class ServerSpec:
    """One MCP server: a stdio `command` (with `args`, `env`, `cwd`) or a streamable-HTTP `url`."""

    name: str
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] | None = None

    def describe(self) -> str:
        return self.url or shlex.join([self.command or "", *self.args])


def _name_from_command(argv: list[str]) -> str:
    """A server's name from its command line: the program's, or for launchers (python, npx, ...)
    the first argument that is not an option (`server.py` -> server, `@scope/server-x` -> server-x)."""
    words = [Path(argv[0]).name, *argv[1:]]
    if re.sub(r"[\d.]+$", "", words[0]) in LAUNCHERS:
        words = [w for w in argv[1:] if not w.startswith("-") and w not in ("run", "-m")] or words
    return _safe(Path(words[0].rsplit("@", 1)[0] if words[0].count("@") > 1 else words[0]).stem)


def _safe(name: str) -> str:
    """A name the model can write in a call (``call:NAME{``): letters, digits, ``_-.``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "server"


def parse_server_command(text: str) -> ServerSpec:
    """`--mcp 'CMD ARGS'`: a stdio server's command line, split as a shell would (no shell runs it)."""
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"--mcp {text!r}: {e}") from None
    if not argv:
        raise ValueError("--mcp: expected a command line, got an empty string")
    return ServerSpec(_name_from_command(argv), command=argv[0], args=argv[1:])


def load_server_config(path: str | Path) -> list[ServerSpec]:
    """Servers from an MCP host config file: ``{"mcpServers": {NAME: {"command", "args", "env",
    "cwd"} or {"url", "headers"}}}`` (the format of Claude Desktop, Cursor, LM Studio); an entry's
    ``type`` may be stdio, http or streamable-http (SSE is not supported)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read the MCP config ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f'{path}: expected an object with "mcpServers": {{NAME: {{...}}}}')
    out = []
    for name, entry in servers.items():
        where = f"{path}: mcpServers.{name}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        kind = entry.get("type", "http" if "url" in entry else "stdio")
        if kind == "sse":
            raise ValueError(f"{where}: SSE servers are not supported; use streamable-http (url)")
        if kind not in ("stdio", "http", "streamable-http", "streamable_http"):
            raise ValueError(f'{where}: unknown "type" {kind!r} (expected stdio or http)')

        def field_of(key: str, kind: type, default: Any = None, entry=entry, where=where) -> Any:
            value = entry.get(key, default)
            if value is not default and not isinstance(value, kind):
                raise ValueError(f'{where}: "{key}" must be a {kind.__name__}')
            if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
                raise ValueError(f'{where}: "{key}" values must be strings')
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ValueError(f'{where}: "{key}" items must be strings')
            return value

        if kind == "stdio":
            command = field_of("command", str)
            if not command:
                raise ValueError(f'{where}: expected "command" (a stdio server) or "url" (an HTTP server)')
            spec = ServerSpec(
                _safe(name), command, field_of("args", list, []), field_of("env", dict), field_of("cwd", str)
            )
        else:
            url = field_of("url", str)
            if not url or not url.startswith(("http://", "https://")):
                raise ValueError(f'{where}: "url" must be an http(s) URL')
            spec = ServerSpec(_safe(name), url=url, headers=field_of("headers", dict))
        out.append(spec)
    return out


@dataclass
class MCPTool:
    name: str  # as declared to the model: the server's name, or server__tool when names collide
    server: str
    remote_name: str  # the server's own name for it
    description: str
    input_schema: dict

    def declaration(self) -> dict:
        """The OpenAI function schema `ChatSession(tools=...)` declares to the model."""
        schema = self.input_schema or {"type": "object", "properties": {}}
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": schema},
        }


@dataclass
class ToolResult:
    text: str  # what the model reads
    images: list = field(default_factory=list)  # PIL images the tool returned
    error: bool = False
    status: str = "ok"  # ok | error | timeout | refused | unknown | invalid | unavailable | interrupted


@dataclass
class ServerState:
    spec: ServerSpec
    status: Literal["starting", "connected", "failed", "stopped"] = "starting"
    error: str = ""
    tools: list = field(default_factory=list)  # the SDK's Tool objects
    log: Path | None = None
    client: Any = None
    stop: Any = None  # an asyncio.Event on the background loop
    done: threading.Event = field(default_factory=threading.Event)  # its task has ended


def _log_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-mlx" / "mcp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _describe_error(e: BaseException) -> str:
    """One line for an exception, unwrapping the exception groups anyio raises."""
    while getattr(e, "exceptions", None):  # an ExceptionGroup
        e = e.exceptions[0]
    if isinstance(e, FileNotFoundError):
        return f"command not found: {e.filename or e}"
    error = getattr(e, "error", None)  # an MCP protocol error: its message, not the tuple
    if getattr(error, "message", None):
        return f"{error.message} (MCP error {error.code})"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class MCPTools:
    """Connections to MCP servers, on an event loop in a background thread.

    `start()` connects to every server (failures are recorded in `servers`, not raised) and names
    their tools; `call()` runs one tool and always returns a `ToolResult`; `close()` stops every
    server (stdio servers are asked to exit, then terminated). Server stderr goes to a log file
    per server (`ServerState.log`), so it never mixes with the chat.
    """

    def __init__(
        self,
        servers: Sequence[ServerSpec],
        timeout: float = 60.0,
        connect_timeout: float = 60.0,
        log_dir: str | Path | None = None,
    ):
        require_sdk()
        names: dict[str, int] = {}
        self.servers: list[ServerState] = []
        for spec in servers:  # unique server names: the second "server" is "server-2"
            n = names[spec.name] = names.get(spec.name, 0) + 1
            unique = spec.name if n == 1 else f"{spec.name}-{n}"
            self.servers.append(ServerState(ServerSpec(**{**vars(spec), "name": unique})))
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.log_dir = Path(log_dir) if log_dir else None
        self.tools: dict[str, MCPTool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[Future] = []

    def __enter__(self) -> MCPTools:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> MCPTools:
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp-clients", daemon=True)
        self._thread.start()
        ready = [threading.Event() for _ in self.servers]
        self._tasks = [
            asyncio.run_coroutine_threadsafe(self._serve(s, r), self._loop)
            for s, r in zip(self.servers, ready, strict=True)
        ]
        deadline = time.monotonic() + self.connect_timeout
        for server, event in zip(self.servers, ready, strict=True):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                server.status, server.error = "failed", f"no answer within {self.connect_timeout:g} s"
                self._tasks[self.servers.index(server)].cancel()
        self._name_tools()
        return self

    async def _serve(self, server: ServerState, ready: threading.Event) -> None:
        """Hold one server's connection open until `stop` (the SDK's context must be left in the
        task that entered it)."""
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        server.stop = asyncio.Event()
        spec = server.spec
        log = None
        try:
            if spec.url:
                http = None
                if spec.headers:
                    import httpx2  # the SDK's HTTP client

                    # the SDK's own client timeouts: a response stream may stay open for minutes
                    http = httpx2.AsyncClient(headers=spec.headers, timeout=httpx2.Timeout(30.0, read=300.0))
                transport: Any = streamable_http_client(spec.url, http_client=http)
            else:
                server.log = (self.log_dir or _log_dir()) / f"{spec.name}.log"
                log = open(server.log, "a")  # noqa: SIM115 (closed below, after the server)
                # `env` adds to the few variables the SDK passes on (PATH, HOME, ...), as other hosts do
                params = StdioServerParameters(
                    command=spec.command, args=spec.args, env=spec.env, cwd=spec.cwd
                )
                transport = _Watched(stdio_client(params, errlog=log), lambda: _exited(server))
            client = Client(transport)
            async with client:
                tools, cursor = [], None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor or len(tools) > 10_000:
                        break
                server.tools, server.client, server.status = tools, client, "connected"
                ready.set()
                await server.stop.wait()
        except BaseException as e:  # noqa: BLE001 (a server's failure is its state, never ours)
            if server.status in ("starting", "connected"):
                server.status, server.error = "failed", _describe_error(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            server.client = None
            if server.status == "connected":
                server.status = "stopped"
            ready.set()
            if log is not None:
                log.close()
            server.done.set()

    def _name_tools(self) -> None:
        """Tool names as the model sees them: the server's own unless two servers share one, then
        ``server__tool`` for each of them."""
        counts: dict[str, int] = {}
        for server in self.servers:
            for t in server.tools:
                counts[_safe(t.name)] = counts.get(_safe(t.name), 0) + 1
        self.tools = {}
        for server in self.servers:
            for t in server.tools:
                name = _safe(t.name)
                if counts[name] > 1:
                    name = f"{server.spec.name}__{name}"
                while name in self.tools:
                    name += "_"
                self.tools[name] = MCPTool(
                    name, server.spec.name, t.name, t.description or "", dict(t.input_schema or {})
                )

    def declarations(self) -> list[dict]:
        return [t.declaration() for t in self.tools.values()]

    def _stop_server(self, server: ServerState) -> None:
        if self._loop is not None and server.stop is not None:
            self._loop.call_soon_threadsafe(server.stop.set)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every server and the background loop (bounded: stdio servers get SIGTERM, then
        SIGKILL, from the SDK)."""
        if self._loop is None:
            return
        for server in self.servers:
            if server.status == "connected":
                server.status = "stopped"
            self._stop_server(server)
        futures_wait(self._tasks, timeout)
        for server, task in zip(self.servers, self._tasks, strict=True):
            if not server.done.is_set():  # it would not stop: cancelling its task kills the process
                task.cancel()
                server.done.wait(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._loop = None

    # --- calls --------------------------------------------------------------------------------

    def server(self, name: str) -> ServerState:
        return next(s for s in self.servers if s.spec.name == name)

    def call(self, name: str, arguments: dict, timeout: float | None = None) -> ToolResult:
        """Run tool `name`; every failure is a `ToolResult` with `error` set. Ctrl-C while it runs
        cancels the call and raises KeyboardInterrupt."""
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return ToolResult(
                f"error: there is no tool named {name!r} (tools: {known})", error=True, status="unknown"
            )
        server = self.server(tool.server)
        if server.status != "connected" or server.client is None or self._loop is None:
            why = f" ({server.error})" if server.error else ""
            return ToolResult(
                f"error: the MCP server {server.spec.name!r} of {name!r} is not running{why}",
                error=True,
                status="unavailable",
            )
        timeout = self.timeout if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(
            server.client.call_tool(tool.remote_name, arguments, read_timeout_seconds=timeout + 1), self._loop
        )
        deadline = time.monotonic() + timeout
        try:
            while True:  # short waits: Ctrl-C reaches this thread between them
                try:
                    result = future.result(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                    break
                except FutureTimeout:
                    if time.monotonic() >= deadline:
                        future.cancel()
                        return ToolResult(
                            f"error: {name} timed out after {timeout:g} s", error=True, status="timeout"
                        )
        except KeyboardInterrupt:
            future.cancel()
            raise
        except BaseException as e:  # noqa: BLE001 (the server failed: the model and the user read it)
            if _connection_closed(e):
                server.status, server.error = "failed", f"exited ({_describe_error(e)})"
                self._stop_server(server)
                why = f"the MCP server {server.spec.name!r} exited"
            else:
                why = _describe_error(e)
            return ToolResult(f"error: {name} failed: {why}", error=True, status="error")
        return _convert(result, name)


def _exited(server: ServerState) -> None:
    if server.status == "connected":  # not our own close()
        server.status, server.error = "failed", "exited"


class _Watched:
    """A transport whose read stream calls `on_end` when it ends: a stdio server that exits while
    idle shows as failed at once, not only at its next call."""

    def __init__(self, transport: Any, on_end: Callable[[], None]):
        self.transport, self.on_end = transport, on_end

    async def __aenter__(self):
        read, write = await self.transport.__aenter__()
        return _WatchedStream(read, self.on_end), write

    async def __aexit__(self, *exc):
        return await self.transport.__aexit__(*exc)


class _WatchedStream:
    def __init__(self, stream: Any, on_end: Callable[[], None]):
        self.stream, self.on_end = stream, on_end

    async def __aenter__(self):
        await self.stream.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self.stream.__aexit__(*exc)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.stream.__anext__()
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                self.on_end()
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _connection_closed(e: BaseException) -> bool:
    """Whether a call failed because the server's connection ended (its process exited)."""
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    return isinstance(e, MCPError) and e.code == CONNECTION_CLOSED


def _convert(result: Any, name: str) -> ToolResult:
    """An MCP CallToolResult as text for the model, images decoded (PIL)."""
    from PIL import Image

    from .media import load_image

    parts, images = [], []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "image":
            try:
                images.append(load_image(base64.b64decode(block.data)))
                parts.append(f"[image {len(images)}: {block.mime_type}]")
            except (ValueError, OSError, Image.DecompressionBombError) as e:
                parts.append(f"[an image the tool returned could not be read: {e}]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(text if text is not None else f"[resource {res.uri} ({res.mime_type or 'binary'})]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        else:
            parts.append(f"[{kind or 'unknown'} content not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... cut: the result had {len(text):,} characters]"
    if result.is_error:
        return ToolResult(f"error: {text or name + ' failed'}", images, error=True, status="error")
    return ToolResult(text, images)


# --- the loop ---------------------------------------------------------------------------------------

Consent = Callable[["MCPTool", ToolCall], "bool | str"]  # True, False or "always" (for this tool)


@dataclass
class AgentEvent:
    """What happens in a turn, in order: `text` (visible text of an answer; `chunk` is the
    generation chunk it came with), `reasoning` (of the thought channel), `call` (a call the model
    made, before it is checked and run), `result` (its outcome), `notice` (one line for the user:
    a failure, the limit)."""

    kind: Literal["text", "reasoning", "call", "result", "notice"]
    text: str = ""
    chunk: Any = None
    call: ToolCall | None = None
    result: ToolResult | None = None


def _text_events(deltas: list, chunk: Any) -> Iterator[AgentEvent]:
    for d in deltas:
        if d.kind in ("content", "reasoning"):
            yield AgentEvent("text" if d.kind == "content" else "reasoning", d.text, chunk=chunk)


class Agent:
    """A chat session whose model can call the tools of MCP servers.

    `send(text)` streams `AgentEvent`s for one user turn: the answer, and for each call the call,
    its result and any notice, then the next answer, until an answer has no calls or
    `max_tool_calls` calls ran this turn (the calls past it are not run; the model is told so and
    answers once more). `consent(tool, call)` is asked before each run (None: every call runs);
    it returns True, False (the model gets a refusal) or "always" (this tool runs from then on).
    Ctrl-C (KeyboardInterrupt) propagates; the session stays usable and the calls left without
    a result get one ("stopped by the user") at the next `send`.
    """

    def __init__(
        self,
        session: ChatSession,
        tools: MCPTools,
        consent: Consent | None = None,
        max_tool_calls: int = 8,
        timeout: float | None = None,
    ):
        self.session, self.mcp = session, tools
        self.consent, self.max_tool_calls, self.timeout = consent, max_tool_calls, timeout
        self.allowed: set[str] = set()  # tools the user allowed for the whole session
        self._unanswered: list[dict] = []  # results owed for calls of the last answer
        session.tools = tools.declarations() or None

    def send(self, text: str) -> Iterator[AgentEvent]:
        owed, self._unanswered = self._unanswered, []
        if not (self.session.history and self.session.history[-1].get("tool_calls")):
            owed = []  # the conversation was reset meanwhile
        yield from self._run(lambda: self.session.send(text, tool_results=owed))

    def _run(self, answer: Callable[[], Iterator]) -> Iterator[AgentEvent]:
        ran, final = 0, False
        while True:
            self._unanswered = []
            chunks, parser, chunk = answer(), OutputParser(thinking=self.session.think), None
            try:  # the visible text: markup (calls, thought delimiters) parsed away
                for chunk in chunks:
                    yield from _text_events(parser.feed(chunk.text), chunk)
                yield from _text_events(parser.finish(), chunk)
            finally:
                chunks.close()
                calls = list(self.session.last_tool_calls)
                self._unanswered = [self._owed(c, "stopped by the user") for c in calls]
            if not calls:
                return
            if final:
                yield AgentEvent("notice", f"{len(calls)} more tool call(s) not run: the limit was reached")
                self._unanswered = [self._owed(c, "not run: the tool-call limit was reached") for c in calls]
                return
            results, images = [], []
            for i, call in enumerate(calls):
                yield AgentEvent("call", call=call)
                if ran >= self.max_tool_calls:
                    result = ToolResult(
                        f"not run: the limit of {self.max_tool_calls} tool calls per turn is reached; "
                        "answer with what you have",
                        error=True,
                        status="refused",
                    )
                    final = True
                else:
                    result = self._run_call(call)
                    ran += 1
                yield AgentEvent("result", call=call, result=result)
                if result.error and not final and result.status != "refused":
                    yield AgentEvent("notice", f"{call.name}: {result.text}")
                results.append({"tool_call_id": call.id, "name": call.name, "content": result.text})
                images += result.images
                self._unanswered = [
                    *results,
                    *(self._owed(c, "stopped by the user") for c in calls[i + 1 :]),
                ]
            if final:
                yield AgentEvent("notice", f"tool-call limit reached ({self.max_tool_calls} calls this turn)")
            note = self._attach(images)
            if images and note is None:
                results[-1]["content"] += "\n[the images are not shown: this model has no vision input]"
            answer = lambda r=results, n=note: self.session.send_tool_results(r, note=n)  # noqa: E731

    def _owed(self, call: ToolCall, why: str) -> dict:
        return {"tool_call_id": call.id, "name": call.name, "content": f"error: {why}"}

    def _attach(self, images: list) -> str | None:
        if not images:
            return None
        if self.session.model.config.vision is None:
            return None
        for image in images:
            self.session.attach_image(image)
        return f"The image{'s' if len(images) > 1 else ''} the tools returned."

    def _run_call(self, call: ToolCall) -> ToolResult:
        tool = self.mcp.tools.get(call.name)
        if tool is None:
            return self.mcp.call(call.name, call.arguments)  # the "no such tool" result
        problem = _schema_problem(tool.input_schema, call.arguments)
        if problem:
            return ToolResult(
                f"error: the arguments do not match {call.name}'s schema: {problem}",
                error=True,
                status="invalid",
            )
        if self.consent is not None and call.name not in self.allowed:
            answer = self.consent(tool, call)
            if answer == "always":
                self.allowed.add(call.name)
            elif not answer:
                return ToolResult("error: the user did not allow this call", error=True, status="refused")
        return self.mcp.call(call.name, call.arguments, self.timeout)


def _schema_problem(schema: dict, arguments: dict) -> str | None:
    """Why `arguments` fail the tool's JSON schema (None when they pass or the schema is unusable:
    then the server judges)."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    error = jsonschema.exceptions.best_match(validator(schema).iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message
