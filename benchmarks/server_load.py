"""Load on the server: many concurrent streaming clients, every answer checked against a solo run.

    python benchmarks/server_load.py [--model DIR] [--clients 16] [--requests 4] [--max-tokens 24]

Each client sends `--requests` streamed greedy chat requests, one after the other, all clients at
once; the server queues them (one generation at a time). Every answer must equal the one the
Python API gives for the same messages alone, none may be lost or fail. The default model is a
tiny random checkpoint (the point is the serving, not the model); `--model` takes a real one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from server_ttft import Server

from gemma_mlx import generate, load
from gemma_mlx.server import create_app
from gemma_mlx.tools import parse_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    path = args.model
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import save_checkpoint

        path = save_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    model, processor = load(path)
    prompts = [f"Question {i}: the quick brown fox?" for i in range(args.clients * args.requests)]
    expected = {}
    for p in prompts:
        alone = generate(model, processor, [{"role": "user", "content": p}], max_tokens=args.max_tokens)
        expected[p] = parse_output(alone.text).content

    srv = Server(create_app(model, processor, model_id="m", max_queue=args.clients * args.requests))
    answers, errors = {}, []

    def client(mine: list[str]) -> None:
        for p in mine:
            try:
                text = ""
                for chunk in srv.client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": p}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    stream=True,
                ):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                answers[p] = text
            except Exception as e:  # counted and reported
                errors.append(f"{p}: {e!r}")

    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(prompts[i :: args.clients],)) for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    srv.close()

    same = sum(answers.get(p) == expected[p] for p in prompts)
    report = (
        f"{path.name}: {args.clients} concurrent streaming clients x {args.requests} requests "
        f"({args.max_tokens} greedy tokens each) on loopback, MLX {mx.__version__} ({mx.default_device()}): "
        f"{len(answers)}/{len(prompts)} completed, {len(errors)} failed, {same}/{len(prompts)} identical to "
        f"the request run alone through `gemma_mlx.generate`; {elapsed:.1f} s in all.\n"
    )
    print(report + "".join(e + "\n" for e in errors[:5]))
    if args.out:
        args.out.write_text(report)
    sys.exit(0 if same == len(prompts) and not errors else 1)


if __name__ == "__main__":
    main()
