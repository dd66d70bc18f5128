"""The server's prefix cache and overhead, measured over loopback with the official `openai` client.

    python benchmarks/server_ttft.py [--model DIR] [--turns 10] [--answer-tokens 16] [--out FILE]

1. A `--turns`-turn conversation sent the way clients send it (the whole history every time),
   once with the prefix cache and once without (`cache_gb=0`): time to first token per turn, and
   the prompt tokens the cache saved. The answers of both runs must be identical (greedy).
2. Decode tokens/s of one long answer through the server (streamed, timed by the client from the
   first to the last token) vs `gemma_mlx.generate` on the same model and prompt.

The default model is the offline Gemma 3 270M when it is present (else a tiny random checkpoint).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import openai
import uvicorn

from gemma_mlx import generate, load
from gemma_mlx.server import create_app

DEFAULT = Path.home() / ".cache" / "gemma-mlx" / "gemma-3-270m-float32"
QUESTIONS = [
    "Name a country in Europe.",
    "What is its capital?",
    "Name a famous building there.",
    "When was it built?",
    "Who designed it?",
    "Name another city in that country.",
    "What is it known for?",
    "Name a river that flows through it.",
    "Which sea does that river reach?",
    "Summarise our conversation in one sentence.",
]


class Server:
    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", timeout=3600)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def stream(client, model_id: str, messages: list[dict], max_tokens: int, think: bool) -> dict:
    """One streamed chat request: time to first token, the answer, usage."""
    start = time.perf_counter()
    first = last = None
    text, usage, n, timings = "", None, 0, None
    extra = {"chat_template_kwargs": {"enable_thinking": True}} if think else {}
    for chunk in client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        timings = (chunk.model_extra or {}).get("timings") or timings
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (delta.content or "") + (delta.model_extra or {}).get("reasoning_content", "")
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
            text += delta.content or ""
    ttft = (first or time.perf_counter()) - start
    return {"ttft": ttft, "text": text, "usage": usage, "span": (first, last), "timings": timings}


def conversation(srv: Server, model_id: str, turns: int, max_tokens: int, think: bool) -> list[dict]:
    history, rows = [], []
    for question in QUESTIONS[:turns]:
        history.append({"role": "user", "content": question})
        r = stream(srv.client, model_id, history, max_tokens, think)
        history.append({"role": "assistant", "content": r["text"]})
        rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--think", action="store_true", help="thinking on (Gemma 4)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    path = args.model or (DEFAULT if DEFAULT.is_dir() else None)
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import save_checkpoint

        path = save_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    model, processor = load(path)
    model_id = path.name

    runs = {}
    for label, cache_gb in (("prefix cache", 4.0), ("no cache", 0.0)):
        srv = Server(create_app(model, processor, model_id=model_id, cache_gb=cache_gb))
        try:
            runs[label] = conversation(srv, model_id, args.turns, args.answer_tokens, args.think)
        finally:
            srv.close()
    cached, cold = runs["prefix cache"], runs["no cache"]
    same = [a["text"] for a in cached] == [b["text"] for b in cold]

    # decode speed: one long answer through the server vs the Python API, same prompt
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
    n = args.decode_tokens
    ref = generate(model, processor, messages, max_tokens=n)
    srv = Server(create_app(model, processor, model_id=model_id, cache_gb=0))
    try:
        stream(srv.client, model_id, [{"role": "user", "content": "Hi"}], 2, False)  # warm-up
        r = stream(srv.client, model_id, messages, n, False)
    finally:
        srv.close()
    tokens = r["usage"].completion_tokens
    first, last = r["span"]
    client_tps = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")

    cpu = platform.processor() or platform.machine()
    lines = [
        f"{model_id}; {args.turns}-turn conversation, whole history sent each turn, "
        f"{args.answer_tokens}-token greedy answers, thinking {'on' if args.think else 'off'}; "
        f"MLX {mx.__version__} on {platform.system()} {cpu} ({os.cpu_count()} cores, {mx.default_device()})",
        "",
        "| turn | prompt tokens | cached | TTFT with prefix cache (s) | TTFT without (s) |",
        "|---|---|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(cached, cold, strict=True), 1):
        lines.append(
            f"| {i} | {a['usage'].prompt_tokens} | {a['usage'].prompt_tokens_details.cached_tokens} | "
            f"{a['ttft']:.2f} | {b['ttft']:.2f} |"
        )
    lines += [
        "",
        f"Turn {args.turns} / turn 1 TTFT: {cached[-1]['ttft'] / cached[0]['ttft']:.2f}x with the prefix "
        f"cache, {cold[-1]['ttft'] / cold[0]['ttft']:.2f}x without. Answers identical in both runs: {same}.",
        "",
        f"Decode, {tokens} tokens of one answer: server {client_tps:.2f} tok/s (client-timed, first to last "
        f"streamed token; {r['timings']['generation_tokens_per_second']:.2f} tok/s by its own clock), "
        f"`gemma_mlx.generate` {ref.stats.generation_tps:.2f} tok/s "
        f"({len(ref.tokens)} tokens); server/generate = {client_tps / ref.stats.generation_tps:.3f}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
