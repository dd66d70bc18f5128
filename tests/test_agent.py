"""Tools from MCP servers: a real MCP server (tests/mcp_server.py, the SDK's MCPServer, formerly
FastMCP) run over stdio and HTTP, and tiny Gemma 4 checkpoints whose greedy decoding calls one of
its tools (tests/tool_model.py), through the Python API loop and `gemma-mlx chat` in a terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from tool_model import build_tool_model

from gemma_mlx import ChatSession, SamplingParams, load
from gemma_mlx.agent import (
    Agent,
    MCPTools,
    ServerSpec,
    load_server_config,
    parse_server_command,
)

SERVER = Path(__file__).with_name("mcp_server.py")
WEATHER = "sunny, 21 C in Paris for 3 days"  # get_weather's text for the model's arguments


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """model(tool, again=False, vision=False) -> (model, processor, path) of a tiny checkpoint that
    calls `tool` (again after each result with `again`)."""
    built: dict = {}

    def get(tool: str, again: bool = False, vision: bool = False):
        key = (tool, again, vision)
        if key not in built:
            path = tmp_path_factory.mktemp(f"calls_{tool}")
            build_tool_model(path, tool, again=again, vision=vision)
            built[key] = (*load(path), path)
        return built[key]

    return get


def server(name: str = "weather") -> ServerSpec:
    return ServerSpec(name, command=sys.executable, args=[str(SERVER), name])


def events_of(agent: Agent, text: str) -> list:
    return [e for e in agent.send(text) if e.kind != "text"]


def prompt_text(session: ChatSession) -> str:
    return session.processor.tokenizer.decode(session.tokens)


def test_loop_asks_runs_gives_results_back_and_stops_at_the_limit(models, tmp_path):
    """The model calls get_weather after every result. Consent y, n, a: the first call runs, the
    second gets a refusal, the third runs and allows the tool for the session, so the fourth runs
    unasked; the fifth is past max_tool_calls=4: not run, the model is told and answers once more
    (it calls again: not run either). Results (text and image) reach the model's next prompt."""
    model, processor, _ = models("get_weather", again=True, vision=True)
    asked, answers = [], [True, False, "always"]

    def consent(tool, call):
        asked.append((tool.name, tool.server, call.arguments))
        return answers[len(asked) - 1]

    with MCPTools([server()], log_dir=tmp_path) as tools:
        assert [s.status for s in tools.servers] == ["connected"]
        assert set(tools.tools) == {"get_weather", "explode", "nap", "crash", "flaky", "strict", "pid"}
        session = ChatSession(model, processor, max_tokens=16, sampling=SamplingParams(temperature=0.0))
        agent = Agent(session, tools, consent=consent, max_tool_calls=4)
        assert {t["function"]["name"] for t in session.tools} == set(tools.tools)
        decl = next(t for t in session.tools if t["function"]["name"] == "get_weather")["function"]
        assert decl["parameters"]["required"] == ["city"]  # the server's JSON schema, declared as is
        events = events_of(agent, "What is the weather in Paris?")

    assert asked == [("get_weather", "weather", {"city": "Paris", "days": 3})] * 3
    results = [e.result for e in events if e.kind == "result"]
    assert [r.status for r in results] == ["ok", "refused", "ok", "ok", "refused"]
    assert [len(r.images) for r in results] == [1, 0, 1, 1, 0]
    assert results[0].text == WEATHER + "\n[image 1: image/png]"
    assert results[1].text == "error: the user did not allow this call"
    assert "limit of 4 tool calls" in results[4].text
    notices = [e.text for e in events if e.kind == "notice"]
    assert notices == [
        "tool-call limit reached (4 calls this turn)",
        "1 more tool call(s) not run: the limit was reached",
    ]
    assert [e.call.name for e in events if e.kind == "call"] == ["get_weather"] * 5

    # what the model read: each result in a tool response, each image as image tokens after it
    text = prompt_text(session)
    assert text.count(f'<|tool_response>response:get_weather{{value:<|"|>{WEATHER}') == 3
    assert text.count('response:get_weather{value:<|"|>error: the user did not allow this call') == 1
    image = model.config.image_token_id
    per_image = session.tokens.count(image) // 3
    assert per_image > 0 and session.tokens.count(image) == 3 * per_image
    assert session.cache[0].offset == len(session.tokens)
    # the call left without a result gets one before the next message (the servers are stopped
    # by now: the calls of that turn say so)
    events = events_of(agent, "Thanks")
    thanks = next(i for i, m in enumerate(session.history) if m.get("content") == "Thanks")
    assert session.history[thanks - 1] == {
        "role": "tool",
        "tool_call_id": session.history[thanks - 2]["tool_calls"][0]["id"],
        "name": "get_weather",
        "content": "error: not run: the tool-call limit was reached",
    }
    assert 'response:get_weather{value:<|"|>error: not run: the tool-call limit was reached' in prompt_text(
        session
    )
    assert "is not running" in next(e.result.text for e in events if e.kind == "result")


@pytest.mark.parametrize(
    "tool, status, text",
    [
        ("explode", "error", "error: Error executing tool explode"),
        ("nap", "timeout", "error: nap timed out after 1 s"),
        (
            "strict",
            "invalid",
            "error: the arguments do not match strict's schema: days: 3 is not of type 'string'",
        ),
        ("crash", "error", "error: crash failed: the MCP server 'weather' exited"),
    ],
)
def test_failures_become_tool_results(models, tmp_path, monkeypatch, tool, status, text):
    """A raising tool, a timeout, arguments failing the schema, and a server that
    dies: each is the call's result (the model reads it) and a notice, never an exception.
    Arguments that fail the schema: the call grammar (llguidance) never lets the model write them,
    so this one runs without it, where the agent's own check is what catches them."""
    model, processor, _ = models(tool)
    if tool == "strict":
        monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    with MCPTools([server()], timeout=1.0 if tool == "nap" else 30.0, log_dir=tmp_path) as tools:
        session = ChatSession(model, processor, max_tokens=16)
        agent = Agent(session, tools, max_tool_calls=1)
        start = time.monotonic()
        events = events_of(agent, "Go")
        assert time.monotonic() - start < 20
        result = next(e.result for e in events if e.kind == "result")
        assert result.status == status and result.error and result.text.startswith(text), result.text
        assert any(e.kind == "notice" and e.text == f"{tool}: {result.text}" for e in events)
        assert f'response:{tool}{{value:<|"|>{result.text}' in prompt_text(session)
        if tool == "crash":  # the server is marked failed; its tools answer so without a call
            assert tools.servers[0].status == "failed" and "exited" in tools.servers[0].error
            again = tools.call("get_weather", {"city": "Rome"})
            assert again.status == "unavailable" and "is not running" in again.text
        if tool == "nap":  # the server survived the cancelled call
            assert tools.call("get_weather", {"city": "Rome", "days": 1}).status == "ok"


def test_a_call_of_an_undeclared_tool_is_never_run(models, tmp_path, monkeypatch):
    """The model calls `missing`, which no server declares: the output parser keeps calls of
    undeclared names as text (as the server does), so nothing runs and no result is owed; a direct
    call of that name is answered as unknown, never raised. (The call grammar, llguidance, never
    lets the model write an undeclared name; this runs without it, where only the parser guards.)"""
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    model, processor, _ = models("missing")
    with MCPTools([server()], timeout=30.0, log_dir=tmp_path) as tools:
        session = ChatSession(model, processor, max_tokens=16)
        events = events_of(Agent(session, tools, max_tool_calls=1), "Go")
        assert not any(e.kind in ("call", "result") for e in events)
        assert "response:missing" not in prompt_text(session)
        result = tools.call("missing", {})
        assert result.status == "unknown" and result.text.startswith(
            "error: there is no tool named 'missing'"
        )


def test_ctrl_c_stops_a_tool_and_keeps_the_session(models, tmp_path):
    """Ctrl-C (SIGINT) while a tool runs: the call is cancelled, KeyboardInterrupt reaches the
    caller, the server lives on, and the next message first gives the model "stopped by the user"."""
    model, processor, _ = models("nap")
    with MCPTools([server()], timeout=30, log_dir=tmp_path) as tools:
        session = ChatSession(model, processor, max_tokens=16)
        agent = Agent(session, tools)
        timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            list(agent.send("Go"))
        assert time.monotonic() - start < 10
        timer.join()
        assert tools.servers[0].status == "connected"
        assert tools.call("get_weather", {"city": "Paris", "days": 3}).text.startswith(WEATHER)
        agent.timeout = 0.5
        events = events_of(agent, "Again")
        again = next(i for i, m in enumerate(session.history) if m.get("content") == "Again")
        assert session.history[again - 1]["content"] == "error: stopped by the user"  # owed
        assert [e.result.status for e in events if e.kind == "result"] == ["timeout"]


def test_servers_that_never_start_collisions_config_and_shutdown(tmp_path):
    """A missing command and a server that exits at once are reported, the others used; the same
    tool on two servers is namespaced; an HTTP server from an mcpServers file; every stdio server
    process has ended after close()."""
    port = free_port()
    http = subprocess.Popen(
        [sys.executable, str(SERVER), "remote", "--http", str(port)], stderr=subprocess.DEVNULL
    )
    try:
        config = tmp_path / "mcp.json"
        config.write_text(
            json.dumps(
                {
                    "mcpServers": {
                        "a": {"command": sys.executable, "args": [str(SERVER), "a"]},
                        "b": {"command": sys.executable, "args": [str(SERVER), "b"], "env": {"X": "1"}},
                        "web": {
                            "type": "http",
                            "url": f"http://127.0.0.1:{port}/mcp",
                            "headers": {"X-Key": "k"},
                        },
                    }
                }
            )
        )
        specs = load_server_config(config)
        specs += [
            parse_server_command("no-such-command-gemma --x"),
            parse_server_command(f"{sys.executable} -c pass"),
        ]
        wait_for_port(port)
        with MCPTools(specs, log_dir=tmp_path) as tools:
            state = {s.spec.name: (s.status, s.error) for s in tools.servers}
            assert state["a"] == state["b"] == state["web"] == ("connected", "")
            assert state["no-such-command-gemma"] == ("failed", "command not found: no-such-command-gemma")
            assert state["pass"][0] == "failed"  # `python -c pass` exits at once
            assert {"a__get_weather", "b__get_weather", "web__get_weather"} <= set(tools.tools)
            assert tools.tools["b__pid"].remote_name == "pid" and tools.tools["b__pid"].server == "b"
            r = tools.call("web__get_weather", {"city": "Paris", "days": 3})
            assert r.status == "ok" and r.text.startswith(WEATHER) and r.images[0].size == (64, 48)
            pids = [int(tools.call(f"{s}__pid", {}).text) for s in ("a", "b")]
            assert all(alive(p) for p in pids)
            os.kill(pids[0], signal.SIGKILL)  # a server dying while idle is seen without a call
            deadline = time.monotonic() + 10
            while tools.servers[0].status == "connected" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (tools.servers[0].status, tools.servers[0].error) == ("failed", "exited")
            assert tools.call("a__get_weather", {"city": "Paris"}).status == "unavailable"
        assert not any(alive(p) for p in pids)
    finally:
        http.terminate()
        http.wait(10)


def test_config_and_command_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for body, message in [
        ("{", "not valid JSON"),
        ('{"servers": {}}', 'expected an object with "mcpServers"'),
        ('{"mcpServers": {"x": {"args": []}}}', 'mcpServers.x: expected "command"'),
        ('{"mcpServers": {"x": {"command": "a", "args": "b"}}}', 'mcpServers.x: "args" must be a list'),
        ('{"mcpServers": {"x": {"type": "sse", "url": "http://h"}}}', "SSE servers are not supported"),
        ('{"mcpServers": {"x": {"url": "ftp://h"}}}', '"url" must be an http(s) URL'),
    ]:
        bad.write_text(body)
        with pytest.raises(
            ValueError,
            match=str(bad).replace(".", r"\.") + ".*" + message.replace("(", r"\(").replace(")", r"\)"),
        ):
            load_server_config(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_server_config(tmp_path / "none.json")
    with pytest.raises(ValueError, match="--mcp: expected a command line"):
        parse_server_command("  ")
    assert (
        parse_server_command("npx -y @modelcontextprotocol/server-filesystem /tmp").name
        == "server-filesystem"
    )
    assert parse_server_command("uvx mcp-server-git --repository .").name == "mcp-server-git"
    assert parse_server_command("python3 -m my_server").name == "my_server"
    assert parse_server_command("/usr/bin/sqlite-mcp db.sqlite").name == "sqlite-mcp"


def test_generate_with_mcp(models, monkeypatch):
    """`gemma-mlx generate --mcp`: one turn with tool calls (--yes: no terminal to ask at), the
    results in --json; without --yes and a terminal it refuses; without the SDK it names the extra."""
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    _, _, path = models("get_weather")
    args = ["generate", "--model", str(path), "-n", "16", "--mcp", f"{sys.executable} {SERVER}"]
    result = CliRunner().invoke(app, [*args, "--yes", "--json", "What is the weather in Paris?"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(m["name"], m["content"]) for m in out["tool_results"]] == [
        (
            "get_weather",
            WEATHER + "\n[image 1: image/png]\n[the images are not shown: this model has no vision input]",
        )
    ]
    assert "every tool call runs without asking" in result.stderr
    assert "[tool call] get_weather" in result.stderr  # with --json, calls go to stderr
    refused = CliRunner().invoke(app, [*args, "Hi"])
    assert refused.exit_code == 1 and "pass --yes" in refused.stderr
    monkeypatch.setitem(sys.modules, "mcp", None)  # as if the agent extra were not installed
    missing = CliRunner().invoke(app, [*args, "--yes", "Hi"])
    assert missing.exit_code == 1 and "pip install 'gemma-mlx[agent]'" in missing.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- gemma-mlx chat --mcp in a real terminal ------------------------------------------------------


def spawn_chat(path: Path, tmp_path: Path, *args: str):
    pexpect = pytest.importorskip("pexpect")
    cmd = [sys.executable, "-m", "gemma_mlx.cli", "chat", "--model", str(path), "-n", "16", "-t", "0", *args]
    env = {"TERM": "dumb", "PATH": os.environ.get("PATH", "/usr/bin"), "XDG_CACHE_HOME": str(tmp_path)}
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=60, env=env, dimensions=(50, 250))
    child.logfile_read = io.StringIO()
    return pexpect, child


@pytest.mark.slow
def test_terminal_chat_asks_before_each_call(models, tmp_path):
    """`gemma-mlx chat --mcp ... --max-tool-calls 3`: the servers and tools are listed (a missing
    one reported), each call is shown and asked (y, n, a), results are shown, the limit stops the
    loop, /tools and /mcp answer, the transcript holds the results the model got; /quit stops it."""
    _, _, path = models("get_weather", again=True, vision=True)
    pexpect, child = spawn_chat(
        path,
        tmp_path,
        "--mcp",
        f"{sys.executable} {SERVER}",
        "--mcp",
        "no-such-command-gemma",
        "--max-tool-calls",
        "3",
    )
    try:
        child.expect(r"\[mcp\] mcp_server: connected, 7 tools: get_weather, explode")
        child.expect(r"\[mcp\] no-such-command-gemma: failed: command not found")
        child.expect(">>> ")
        child.sendline("What is the weather in Paris?")
        for answer, shown in [
            ("y", r"-> ok, 1 image\(s\)\] " + WEATHER),
            ("n", r"-> refused\] error: the user did not"),
            ("a", "-> ok"),
        ]:
            child.expect(r'\[tool call\] get_weather \{"city": "Paris", "days": 3\}')
            child.expect(r"allow get_weather \(mcp_server\)\? \[y\]es / \[n\]o / \[a\]lways: ")
            child.sendline(answer)
            child.expect(r"\[get_weather " + shown)
        child.expect(r"\[tool-call limit reached \(3 calls this turn\)\]")
        child.expect(">>> ")
        child.sendline("/tools")
        child.expect(
            r"get_weather \(mcp_server; args: city, days\): Current weather in a city, with a forecast chart"
        )
        child.sendline("/mcp")
        child.expect(r"\[mcp\] no-such-command-gemma: failed")
        child.sendline(f"/save {tmp_path / 't.json'}")
        child.expect(r"\[transcript saved")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()
    transcript = json.loads((tmp_path / "t.json").read_text())
    assert transcript[1]["content"] == '[tool call: get_weather {"city": "Paris", "days": 3}]'
    tool_messages = [m["content"] for m in transcript if m["role"] == "tool"]
    assert tool_messages[:2] == [
        WEATHER + "\n[image 1: image/png]",
        "error: the user did not allow this call",
    ]


@pytest.mark.slow
def test_terminal_chat_survives_a_timeout_and_a_crashing_server(models, tmp_path):
    """--yes (with its warning): the first `flaky` call times out, the second kills the server,
    the third finds it gone; each is reported and the chat goes on."""
    _, _, path = models("flaky", again=True)
    pexpect, child = spawn_chat(
        path,
        tmp_path,
        "--mcp",
        f"{sys.executable} {SERVER}",
        "--yes",
        "--tool-timeout",
        "1",
        "--max-tool-calls",
        "3",
    )
    try:
        child.expect("warning: --yes: every tool call runs without asking")
        child.expect(">>> ")
        child.sendline("Go")
        child.expect(r"\[flaky: error: flaky timed out after 1 s\]")
        child.expect(r"\[flaky: error: flaky failed: the MCP server 'mcp_server' exited\]")
        child.expect(r"\[flaky: error: the MCP server 'mcp_server' of 'flaky' is not running")
        child.expect(r"\[tool-call limit reached")
        child.expect(">>> ")
        child.sendline("/mcp")
        child.expect(r"\[mcp\] mcp_server: failed: exited")
        child.sendline("Still there?")
        child.expect(r"\[tool call\] flaky")
        child.expect(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()


@pytest.mark.slow
def test_terminal_ctrl_c_stops_a_tool_and_keeps_the_session(models, tmp_path):
    """Ctrl-C while `nap` runs: the chat says so, its prompt comes back, the server still runs."""
    _, _, path = models("nap")
    pexpect, child = spawn_chat(path, tmp_path, "--mcp", f"{sys.executable} {SERVER}", "--yes")
    try:
        child.expect(">>> ")
        child.sendline("Go")
        child.expect(r"\[tool call\] nap")
        time.sleep(1.0)
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect(">>> ")
        child.sendline("/mcp")
        child.expect(r"\[mcp\] mcp_server: connected")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()


def test_a_template_without_tools_is_noticed(models, tmp_path):
    """A chat template that ignores `tools` (Gemma 3's, say): `chat --mcp` warns that the model
    cannot call them."""
    import shutil

    from tool_model import TOOL

    from gemma_mlx.cli.agent import declares_tools

    _, _, path = models("get_weather")
    assert declares_tools(ChatSession(*load(path), tools=[TOOL]))
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    (plain / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
        "{% endfor %}<start_of_turn>model\n"
    )
    assert not declares_tools(ChatSession(*load(plain), tools=[TOOL]))


def test_results_are_converted_and_cut():
    """What the model reads of each MCP content type; a long result is cut with a note; a broken
    image is named instead of failing the call."""
    import base64

    import mcp_types as t

    from gemma_mlx.agent import MAX_RESULT_CHARS, _convert

    blocks = [
        t.TextContent(text="hello"),
        t.ImageContent(data=base64.b64encode(b"not a png").decode(), mime_type="image/png"),
        t.EmbeddedResource(resource=t.TextResourceContents(uri="file:///x.txt", text="inside")),
        t.ResourceLink(uri="file:///y.bin", name="y"),
    ]
    r = _convert(t.CallToolResult(content=blocks), "f")
    assert not r.error and r.images == []
    lines = r.text.split("\n")
    assert lines[0] == "hello" and lines[1].startswith("[an image the tool returned could not be read: ")
    assert lines[2:] == ["inside", "[resource link: file:///y.bin]"]
    long = _convert(t.CallToolResult(content=[t.TextContent(text="a" * (MAX_RESULT_CHARS + 5))]), "f")
    assert (
        long.text
        == "a" * MAX_RESULT_CHARS + f"\n[... cut: the result had {MAX_RESULT_CHARS + 5:,} characters]"
    )
    structured = _convert(t.CallToolResult(content=[], structured_content={"n": 1}), "f")
    assert structured.text == '{"n": 1}'
    failed = _convert(t.CallToolResult(content=[], is_error=True), "f")
    assert failed.error and failed.text == "error: f failed"
