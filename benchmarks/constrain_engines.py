"""llguidance vs xgrammar on Gemma's vocabulary (262,144 tokens): the cost of a token mask.

For each engine: the one-time vocabulary setup, the compile time of a nested JSON schema (no
cache), and the time per token of computing the mask while a valid answer (tokenized by our
tokenizer) is fed token by token, p50/p90/max over the answer's tokens, best of `--repeat`.
Run: python benchmarks/constrain_engines.py [--model DIR] [--out benchmarks/results/constrain_engines.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from gemma_mlx.constrain import token_bytes
from gemma_mlx.processor import Processor

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
            },
            "required": ["street", "city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "address", "role", "active"],
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines"],
    "address": {
        "street": "12 St James's Square",
        "city": "London",
        "zip": "10001",
        "geo": {"lat": 51.5074, "lon": -0.1278},
    },
    "role": "admin",
    "active": True,
    "scores": [9.5, 8.25, 10],
}


def stats(times: list[float]) -> dict:
    t = np.array(times) * 1e6
    return {"p50_us": float(np.median(t)), "p90_us": float(np.percentile(t, 90)), "max_us": float(t.max())}


def bench_llguidance(processor, ids, repeat):
    import llguidance

    from gemma_mlx.constrain import vocabulary

    tic = time.perf_counter()
    tok = vocabulary(processor).lltokenizer
    setup = time.perf_counter() - tic
    vocab = tok.vocab_size
    best = None
    for _ in range(repeat):
        tic = time.perf_counter()
        compact = {"whitespace_flexible": False}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=compact)
        matcher = llguidance.LLMatcher(tok, grammar)
        compile_s = time.perf_counter() - tic
        assert not matcher.is_error(), matcher.get_error()
        mask = np.zeros((vocab + 31) // 32, np.int32)
        times = []
        for t in ids:
            tic = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            times.append(time.perf_counter() - tic)
            assert mask[t // 32] >> (t % 32) & 1, f"token {t} masked"
            assert matcher.consume_token(t), matcher.get_error()
        assert matcher.is_accepting()
        run = {"compile_s": compile_s, **stats(times), "mean_us": float(np.mean(times) * 1e6)}
        best = run if best is None or run["mean_us"] < best["mean_us"] else best
    return {"engine": f"llguidance {version('llguidance')}", "setup_s": setup, **best}


def bench_xgrammar(tokens, special, eos, vocab, ids, repeat):
    import xgrammar  # its bitmask is a torch tensor

    special = set(special)
    encoded = [b"" if i in special else t for i, t in enumerate(tokens)]
    tic = time.perf_counter()
    info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.RAW, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - tic
    best = None
    for _ in range(repeat):
        tic = time.perf_counter()
        text = json.dumps(SCHEMA)
        compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        compile_s = time.perf_counter() - tic
        matcher = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            tic = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - tic)
            assert int(mask[0, t // 32]) >> (t % 32) & 1, f"token {t} masked"
            assert matcher.accept_token(t)
        run = {"compile_s": compile_s, **stats(times), "mean_us": float(np.mean(times) * 1e6)}
        best = run if best is None or run["mean_us"] < best["mean_us"] else best
    return {"engine": f"xgrammar {version('xgrammar')}", "setup_s": setup, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the offline Gemma 3 270M)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "constrain_engines.json"))
    args = ap.parse_args()
    if args.model is None:
        from gemma_mlx.convert.default_model import default_model_path

        args.model = default_model_path()
    processor = Processor.from_dir(args.model)
    tokens, special = token_bytes(processor.tokenizer)
    vocab = len(tokens)
    eos = processor.eos_token_ids
    ids = processor.tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")))
    rows = [
        bench_llguidance(processor, ids, args.repeat),
        bench_xgrammar(tokens, special, eos, vocab, ids, args.repeat),
    ]
    out = {
        "machine": f"{platform.machine()} {platform.system()}, shared 2-core box (load varies)",
        "vocabulary": vocab,
        "answer_tokens": len(ids),
        "schema": "nested: 3 levels of objects, arrays with min/maxItems, enum, pattern, ranges",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['engine']:18s} setup {r['setup_s']:.2f} s  compile {r['compile_s'] * 1e3:.1f} ms  "
            f"mask p50 {r['p50_us']:.0f} us  p90 {r['p90_us']:.0f} us  max {r['max_us']:.0f} us  "
            f"mean {r['mean_us']:.0f} us"
        )


if __name__ == "__main__":
    main()
