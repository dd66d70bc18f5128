"""The terminal side of `gemma_mlx.agent`: `--mcp` options, the consent prompt, showing calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from gemma_mlx.agent import Agent, AgentEvent, MCPTool, MCPTools, ServerSpec
from gemma_mlx.tools import ToolCall

from .common import fail

McpOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--mcp",
        help="A stdio MCP server's command line, e.g. 'npx -y @modelcontextprotocol/server-filesystem .' "
        "(repeatable; extra: agent).",
    ),
]
McpConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--mcp-config", help='MCP servers from a JSON file ({"mcpServers": {...}}: stdio and http).'
    ),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Run every tool call without asking (careful).")]
MaxToolCallsOpt = Annotated[
    int, typer.Option("--max-tool-calls", min=1, help="Tool calls the model may make per turn.")
]
ToolTimeoutOpt = Annotated[
    float, typer.Option("--tool-timeout", min=0.1, help="Seconds a tool call may take before it is stopped.")
]


def server_specs(commands: list[str] | None, config: Path | None) -> list[ServerSpec]:
    """The servers named by --mcp / --mcp-config, checked (with the SDK's presence) before the
    model is loaded."""
    from gemma_mlx.agent import MCPUnavailable, load_server_config, parse_server_command, require_sdk

    specs = [parse_server_command(c) for c in commands or []]
    if config is not None:
        specs += load_server_config(config)
    if specs:
        try:
            require_sdk()
        except MCPUnavailable as e:
            fail(f"--mcp: {e}")
    return specs


def open_tools(specs: list[ServerSpec], timeout: float) -> MCPTools | None:
    """Connect to the servers and print them with their tools (None when there are none). Servers
    that fail are reported in one line each; the rest are used."""
    if not specs:
        return None
    tools = MCPTools(specs, timeout=timeout)
    typer.secho(f"connecting to {len(specs)} MCP server(s)...", err=True, dim=True)
    try:
        tools.start()
    except BaseException:  # Ctrl-C while connecting: stop what did start
        tools.close()
        raise
    for line in server_lines(tools):
        typer.secho(line, err=True, fg=None if "failed" not in line else typer.colors.RED)
    return tools


def server_lines(tools: MCPTools) -> list[str]:
    lines = []
    for s in tools.servers:
        names = [t.name for t in tools.tools.values() if t.server == s.spec.name]
        if s.status == "connected":
            lines.append(f"[mcp] {s.spec.name}: connected, {len(names)} tools: {', '.join(names) or '-'}")
        else:
            why = f": {s.error}" if s.error else ""
            log = f" (server log: {s.log})" if s.log and s.status == "failed" else ""
            lines.append(f"[mcp] {s.spec.name}: {s.status}{why}{log}")
    return lines


def tool_lines(tools: MCPTools) -> list[str]:
    if not tools.tools:
        return ["[no tools]"]
    lines = []
    for t in tools.tools.values():
        about = " ".join(t.description.split())
        about = about[:90] + "..." if len(about) > 90 else about
        args = ", ".join(t.input_schema.get("properties", {})) or "-"
        lines.append(f"  {t.name} ({t.server}; args: {args}): {about}")
    return lines


def show_call(call: ToolCall) -> str:
    return f"{call.name} {json.dumps(call.arguments, ensure_ascii=False)}"


def ask_consent(tool: MCPTool, call: ToolCall) -> bool | str:
    """y / n / a(lways for this tool this session); end of input is a no."""
    while True:
        try:
            answer = input(f"  allow {tool.name} ({tool.server})? [y]es / [n]o / [a]lways: ").strip().lower()
        except EOFError:
            typer.echo()
            return False
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        if answer in ("a", "always"):
            return "always"


def warn_yes() -> None:
    typer.secho(
        "warning: --yes: every tool call runs without asking; the tools can do whatever their servers can",
        fg=typer.colors.YELLOW,
        err=True,
    )


def make_agent(session, tools: MCPTools, yes: bool, max_tool_calls: int) -> Agent:
    if yes:
        warn_yes()
    agent = Agent(session, tools, consent=None if yes else ask_consent, max_tool_calls=max_tool_calls)
    if session.tools and not declares_tools(session):
        typer.secho(
            "warning: this model's chat template does not declare tools (Gemma 3?): it will not call them",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return agent


def declares_tools(session) -> bool:
    """Whether the chat template writes the tool declarations into the prompt at all."""
    name = session.tools[0]["function"]["name"]
    probe = session.processor.apply_chat_template([{"role": "user", "content": "?"}], tools=session.tools[:1])
    return name in probe


def render(events: Iterator[AgentEvent], echo_text: bool = True) -> str:
    """Print a turn's events: the answers' visible text (thoughts dimmed), each call, its result in
    one line, notices in yellow. Returns the text of the last answer."""
    last: list[str] = []
    for event in events:
        if event.kind in ("text", "reasoning"):
            if event.kind == "text":
                last.append(event.text)
            if echo_text:
                typer.secho(event.text, nl=False, dim=event.kind == "reasoning")
            continue
        if last and echo_text:
            typer.echo()  # the answer before the call ends its line
        last = []
        if event.kind == "call":
            typer.secho(f"[tool call] {show_call(event.call)}", fg=typer.colors.CYAN, err=not echo_text)
        elif event.kind == "result" and not (event.result.error and event.result.status != "refused"):
            r = event.result  # (a failure's line is its notice)
            head = (r.text.strip().splitlines() or [""])[0]
            head = head[:160] + ("..." if len(head) > 160 else "")
            images = f", {len(r.images)} image(s)" if r.images else ""
            typer.secho(f"[{event.call.name} -> {r.status}{images}] {head}", dim=True, err=not echo_text)
        elif event.kind == "notice":
            typer.secho(f"[{event.text}]", fg=typer.colors.YELLOW, err=True)
    return "".join(last)
