"""`gemma-mlx chat`: an interactive terminal session on top of `gemma_mlx.chat.ChatSession`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from gemma_mlx.chat import ChatSession

from . import agent as agent_cli
from .common import show_error

HELP = """Commands:
  /image PATH     attach an image to your next message
  /audio PATH     attach an audio clip to your next message
  /system TEXT    set the system prompt (starts a new conversation)
  /think on|off   let the model think before answering
  /reset          forget the conversation
  /stats          speed, context used, cache reuse of the last turn
  /save FILE      write the transcript (markdown, or JSON for *.json)
  /tools          the MCP tools the model may call (--mcp)
  /mcp            the MCP servers and their state
  /help           this list
  /quit           leave (Ctrl-D works too); Ctrl-C stops an answer or a tool"""


def _history_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-mlx"
    root.mkdir(parents=True, exist_ok=True)
    return root / "chat_history"


def save_transcript(session: ChatSession, path: Path) -> None:
    messages = ([{"role": "system", "content": session.system}] if session.system else []) + session.history

    def text(message: dict) -> str:
        content = message["content"]
        if not isinstance(content, str):
            content = " ".join(
                p["text"] if p["type"] == "text" else f"[{p['type']}: {p.get(p['type'])}]" for p in content
            )
        calls = [c["function"] for c in message.get("tool_calls", [])]
        return " ".join(
            [content, *(f"[tool call: {c['name']} {json.dumps(c['arguments'])}]" for c in calls)]
        ).strip()

    if path.suffix == ".json":
        body = json.dumps(
            [{"role": m["role"], "content": text(m)} for m in messages],
            indent=2,
            ensure_ascii=False,
        )
    else:
        body = "\n\n".join(f"**{m['role']}**: {text(m)}" for m in messages) + "\n"
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(body)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write or rename: leave nothing behind


def command(session: ChatSession, line: str, agent: agent_cli.Agent | None = None) -> bool:
    """Run one /command; returns False to quit. Errors are reported, the session goes on."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    echo = typer.echo
    try:
        if name in ("quit", "exit", "q"):
            return False
        elif name == "help":
            echo(HELP)
        elif name == "image" and arg:
            session.attach_image(arg)
            echo(f"[image attached: {arg}]")
        elif name == "audio" and arg:
            session.attach_audio(arg)
            echo(f"[audio attached: {arg}]")
        elif name == "system":
            session.system = arg or None
            session.reset()
            echo("[system prompt set; new conversation]")
        elif name == "think" and arg in ("on", "off"):
            if arg == "on" and not session.processor.supports_thinking:
                raise ValueError("this model's chat template has no thinking mode")
            session.think = arg == "on"
            echo(f"[thinking {arg}]")
        elif name == "reset":
            session.reset()
            echo("[conversation reset]")
        elif name == "stats":
            s = session.stats
            if not session.history:
                echo("[no turn yet]")
            else:
                reused = f" after {s.cached_prompt_tokens} cached" if s.cached_prompt_tokens else ""
                rate = f" at {s.generation_tps:.1f} tok/s" if s.generation_tokens > 1 else ""
                echo(
                    f"[last turn: {s.prompt_tokens} prompt tokens{reused} at {s.prompt_tps:.1f} tok/s, "
                    f"{s.generation_tokens} generated{rate}; context "
                    f"{len(session.tokens)}/{session.context} tokens; "
                    + (
                        f"drafts accepted {s.accepted}/{s.drafted} ({s.acceptance:.0%})]"
                        if s.drafted
                        else "no drafter]"
                    )
                )
        elif name in ("tools", "mcp"):
            if agent is None:
                echo("[no MCP servers: start the chat with --mcp 'COMMAND' or --mcp-config FILE]")
            else:
                lines = (
                    agent_cli.tool_lines(agent.mcp) if name == "tools" else agent_cli.server_lines(agent.mcp)
                )
                echo("\n".join(lines))
        elif name == "save" and arg:
            save_transcript(session, Path(arg).expanduser())
            echo(f"[transcript saved to {arg}]")
        else:
            echo(f"[unknown command or missing argument: /{name}; /help lists the commands]")
    except (ValueError, OSError) as e:
        show_error(str(e))
    return True


def repl(session: ChatSession, banner: str, agent: agent_cli.Agent | None = None) -> None:
    try:
        import readline  # line editing and history for input()

        history = _history_file()
        if history.exists():
            readline.read_history_file(history)
    except (ImportError, OSError):
        readline = None
    typer.secho(banner, fg=typer.colors.CYAN)
    typer.echo("Type /help for commands.")
    try:
        while True:
            try:
                line = input(">>> ").strip()
            except KeyboardInterrupt:
                typer.echo()
                continue
            except EOFError:
                typer.echo()
                break
            if not line:
                continue
            if line.startswith("/"):
                if not command(session, line, agent):
                    break
                continue
            answer = session.send(line) if agent is None else agent.send(line)
            try:
                if agent is None:
                    for chunk in answer:
                        typer.echo(chunk.text, nl=False)
                else:
                    agent_cli.render(answer)
                typer.echo()
            except KeyboardInterrupt:
                typer.secho("\n[interrupted]", fg=typer.colors.YELLOW)
            except (ValueError, OSError, RuntimeError) as e:  # the session goes on (/save still works)
                show_error(str(e), prefix="\n")
            finally:
                answer.close()  # settle the session's cache now, not whenever the generator is collected
            for notice in session.notices:
                typer.secho(f"[{notice}]", fg=typer.colors.YELLOW)
            session.notices.clear()
    finally:
        if readline is not None:
            try:
                readline.write_history_file(_history_file())
            except OSError:
                pass
