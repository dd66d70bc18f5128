"""An agent loop through each chat API of the server: prefix-cache reuse and time to first token per turn.

    python benchmarks/agent_loop.py [--model DIR] [--turns 6] [--answer-tokens 16] [--out FILE]

Each loop sends a long agent-style system prompt and `--turns` user turns, over loopback with the
official clients, streamed:
- Chat Completions, the whole history every turn;
- Responses, the whole history every turn (as Codex CLI does);
- Responses, chained with `previous_response_id` (only the new user turn sent);
- Anthropic Messages, the whole history every turn (as Claude Code does).
Per turn: prompt tokens, the tokens the prefix cache reused (`cached_tokens` /
`cache_read_input_tokens`) and TTFT (client clock, request to first streamed text delta).
The default model is the offline Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import anthropic
import mlx.core as mx
from server_ttft import DEFAULT, QUESTIONS, Server

from gemma_mlx import load
from gemma_mlx.server import create_app

# an agent's instructions are long (Codex's and Claude Code's are thousands of tokens); this
# paragraph is about 55 tokens with Gemma 3's tokenizer, repeated --system-repeats times
RULES = " ".join(
    [
        "You are a careful coding agent working in a user's repository. Read files before changing them,",
        "keep changes small, run the tests that cover what you changed, and explain what you did.",
        "Never invent results; when something fails, say so and show the error.",
    ]
)


def chat_loop(srv: Server, model: str, turns: int, n: int, system: str) -> list[dict]:
    client, history, rows = srv.client, [{"role": "system", "content": system}], []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        start, first, text, usage = time.perf_counter(), None, "", None
        for c in client.chat.completions.create(
            model=model,
            messages=history,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            usage = c.usage or usage
            if c.choices and c.choices[0].delta.content:
                first = first or time.perf_counter()
                text += c.choices[0].delta.content
        history.append({"role": "assistant", "content": text})
        ttft = (first or time.perf_counter()) - start
        rows.append(row(ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
    return rows


def responses_loop(srv: Server, model: str, turns: int, n: int, system: str, chained: bool) -> list[dict]:
    client, history, rows, previous = srv.client, [], [], None
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        start, first, final = time.perf_counter(), None, None
        kwargs = (
            {"previous_response_id": previous, "input": q} if chained and previous else {"input": history}
        )
        for e in client.responses.create(
            model=model, instructions=system, max_output_tokens=n, temperature=0, stream=True, **kwargs
        ):
            if e.type == "response.output_text.delta":
                first = first or time.perf_counter()
            elif e.type in ("response.completed", "response.incomplete"):
                final = e.response
        history.append({"role": "assistant", "content": final.output_text})
        previous = final.id
        ttft = (first or time.perf_counter()) - start
        rows.append(row(ttft, final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens))
    return rows


def messages_loop(srv: Server, model: str, turns: int, n: int, system: str) -> list[dict]:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{srv.port}", api_key="-", timeout=3600)
    history, rows = [], []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        start, first = time.perf_counter(), None
        with client.messages.stream(
            model=model, system=system, messages=history, max_tokens=n
        ) as s:  # greedy: the checkpoint's generation config (this SDK takes no temperature argument)
            for e in s:
                if e.type == "content_block_delta":
                    first = first or time.perf_counter()
            final = s.get_final_message()
        text = "".join(b.text for b in final.content if b.type == "text")
        history.append({"role": "assistant", "content": text or "."})
        u = final.usage
        ttft = (first or time.perf_counter()) - start
        rows.append(row(ttft, u.input_tokens + u.cache_read_input_tokens, u.cache_read_input_tokens))
    return rows


def row(ttft: float, prompt: int, cached: int) -> dict:
    return {"ttft": ttft, "prompt": prompt, "cached": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--system-repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    system = " ".join([RULES] * args.system_repeats)
    path = args.model or DEFAULT
    model, processor = load(path)
    name, n, turns = path.name, args.answer_tokens, args.turns
    loops = {
        "Chat Completions, full history": lambda s: chat_loop(s, name, turns, n, system),
        "Responses, full history": lambda s: responses_loop(s, name, turns, n, system, chained=False),
        "Responses, previous_response_id": lambda s: responses_loop(s, name, turns, n, system, chained=True),
        "Messages, full history": lambda s: messages_loop(s, name, turns, n, system),
    }
    cpu = platform.processor() or platform.machine()
    lines = [
        f"{name}; {turns}-turn agent loop per API, {len(processor.encode_text(system))}-token system prompt, "
        f"{n}-token greedy answers, streamed; a fresh server (empty prefix cache) per loop; "
        f"MLX {mx.__version__} on {platform.system()} {cpu} ({os.cpu_count()} cores, {mx.default_device()})",
        "",
    ]
    srv = Server(create_app(model, processor, model_id=name))
    try:
        chat_loop(
            srv, name, 2, n, system
        )  # warm-up (compiles, allocations); each loop then gets a fresh server
    finally:
        srv.close()
    for label, loop in loops.items():
        srv = Server(create_app(model, processor, model_id=name))
        try:
            rows = loop(srv)
        finally:
            srv.close()
        lines += [f"### {label}", "", "| turn | prompt tokens | cached | TTFT (s) |", "|---|---|---|---|"]
        lines += [f"| {i} | {r['prompt']} | {r['cached']} | {r['ttft']:.3f} |" for i, r in enumerate(rows, 1)]
        ratio = rows[-1]["ttft"] / rows[0]["ttft"]
        all_cached = all(r["cached"] > 0 for r in rows[1:])
        lines += [
            "",
            f"Turn {turns} / turn 1 TTFT: {ratio:.2f}x; cached tokens on every later turn: {all_cached}.",
            "",
        ]
        print("\n".join(lines[-(turns + 7) :]), flush=True)
        if args.out:
            args.out.write_text("\n".join(lines))
    report = "\n".join(lines)
    if args.out:
        args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
