"""Constrained decoding, measured: overhead and reliability.

`overhead`: decode tok/s with a nested JSON schema against the same prompt unconstrained, on one
model in one run (rounds interleaved, median of `--rounds`); the goal is >= 0.95x.
`reliability`: `--n` generations over the schemas of tests/data/json_schemas.json (cycled, seeds
varied): how many parse and validate with jsonschema, constrained and, for contrast, the same
prompts unconstrained. Run on the offline 270M (default) or a random tiny model (`--tiny`).

    python benchmarks/constrain_decode.py overhead
    python benchmarks/constrain_decode.py reliability --n 200 [--tiny] [--start N] [--contrast M]
    python benchmarks/constrain_decode.py summary   # merges the 270M's reliability parts
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

from gemma_mlx import load
from gemma_mlx.generate import generate

sys.path.insert(0, str(Path(__file__).parent))
from constrain_engines import SCHEMA  # noqa: E402 (the nested schema of the engine comparison)

SCHEMAS = json.loads((Path(__file__).parents[1] / "tests" / "data" / "json_schemas.json").read_text())
RESULTS = Path(__file__).parent / "results"


def model_and_name(tiny: bool):
    if tiny:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from test_constrain import SMALL
        from tiny import save_checkpoint

        path = save_checkpoint(Path(tempfile.mkdtemp()) / "small", config=SMALL, seed=3)
        return load(path), "random tiny Gemma 4 (2 layers, hidden 32, vocabulary 512)"
    from gemma_mlx.convert.default_model import default_model_path

    return load(default_model_path()), "Gemma 3 270M (float32, vocabulary 262,144)"


def overhead(args) -> dict:
    (model, processor), name = model_and_name(args.tiny)
    prompt = "Here is the record of the customer as JSON: "
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    rows = {"unconstrained": [], "constrained": []}
    tokens = {"unconstrained": [], "constrained": []}
    generate(model, processor, prompt, max_tokens=8)  # warm up
    generate(model, processor, prompt, max_tokens=8, response_format=fmt)
    for _ in range(args.rounds):
        for kind, extra in (("unconstrained", {}), ("constrained", {"response_format": fmt})):
            r = generate(model, processor, prompt, max_tokens=args.max_tokens, **extra)
            rows[kind].append(r.stats.generation_tps)
            tokens[kind].append(r.stats.generation_tokens)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": name,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tok_s": rows,
        "generated_tokens": tokens,
        "median_tok_s": med,
        "ratio": med["constrained"] / med["unconstrained"],
    }


def _valid(text: str, schema: dict) -> tuple[bool, bool]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def reliability(args) -> dict:
    (model, processor), name = model_and_name(args.tiny)
    out = {"model": name, "n": args.n, "schemas": len(SCHEMAS), "max_tokens": args.max_tokens}
    contrast = args.n if args.contrast is None else args.contrast
    out.update(contrast_n=contrast, start=args.start)
    for kind in ("constrained", "unconstrained"):
        parsed = valid = length = 0
        failures = []
        tic = time.perf_counter()
        count = args.n if kind == "constrained" else contrast
        for i in range(args.start, args.start + count):
            schema = SCHEMAS[i % len(SCHEMAS)]
            prompt = f"Answer with JSON valid against this schema: {json.dumps(schema)}\nJSON: "
            fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
            extra = {"response_format": fmt}
            r = generate(
                model,
                processor,
                prompt,
                max_tokens=args.max_tokens,
                temperature=1.0,
                seed=i,
                **(extra if kind == "constrained" else {}),
            )
            p, v = _valid(r.text.strip(), schema)
            parsed, valid, length = parsed + p, valid + v, length + (r.finish_reason == "length")
            if not v and len(failures) < 5:
                failures.append({"schema": i % len(SCHEMAS), "finish": r.finish_reason, "text": r.text[:120]})
        out[kind] = {
            "parsed": parsed,
            "valid": valid,
            "cut_off": length,
            "seconds": round(time.perf_counter() - tic, 1),
            "failures": failures,
        }
        print(kind, out[kind]["parsed"], out[kind]["valid"], out[kind]["cut_off"], flush=True)
    return out


def summary() -> dict:
    """The reliability parts on the 270M (`constrain_reliability.json`, `..._fromN.json`), merged:
    counts over every generation, and which generation numbers each kind covers."""
    out: dict = {"model": None, "parts": []}
    covered: dict[str, list[int]] = {"constrained": [], "unconstrained": []}
    totals = {k: {"n": 0, "parsed": 0, "valid": 0, "cut_off": 0, "seconds": 0.0} for k in covered}
    failures = []
    for path in sorted(RESULTS.glob("constrain_reliability*.json")):
        if not re.fullmatch(r"constrain_reliability(_from\d+)?\.json", path.name):
            continue
        part = json.loads(path.read_text())
        start = part.get("start", 0)
        out["model"] = out["model"] or part["model"]
        if part["model"] != out["model"] or part["max_tokens"] != 64:
            raise SystemExit(f"{path.name}: another model or max_tokens than the other parts")
        for kind, count in (("constrained", part["n"]), ("unconstrained", part["contrast_n"])):
            if not count:
                continue
            covered[kind] += range(start, start + count)
            t = totals[kind]
            t["n"] += count
            for key in ("parsed", "valid", "cut_off", "seconds"):
                t[key] += part[kind][key]
            failures += [{"kind": kind, "file": path.name, **f} for f in part[kind]["failures"]]
        out["parts"].append(
            {"file": path.name, "start": start, "n": part["n"], "contrast_n": part["contrast_n"]}
        )
    for kind, idx in covered.items():
        if len(idx) != len(set(idx)):
            raise SystemExit(f"{kind}: a generation number is counted twice")
        totals[kind]["numbers"] = _ranges(sorted(idx))
        totals[kind]["seconds"] = round(totals[kind]["seconds"], 1)
    out.update(totals, max_tokens=64, failures_shown=failures)
    return out


def _ranges(idx: list[int]) -> str:
    """ "0-22, 30-39" from sorted numbers."""
    runs, first = [], None
    for i, k in enumerate(idx):
        first = k if first is None else first
        if i + 1 == len(idx) or idx[i + 1] != k + 1:
            runs.append(f"{first}-{k}" if k != first else str(k))
            first = None
    return ", ".join(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["overhead", "reliability", "summary"])
    ap.add_argument("--tiny", action="store_true", help="a random tiny model instead of the 270M")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--contrast", type=int, default=None, help="unconstrained generations (default: --n)")
    ap.add_argument("--start", type=int, default=0, help="first generation's number (schema and seed)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    if args.what == "summary":
        result = summary()
        (RESULTS / "constrain_reliability_summary.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "failures_shown"}, indent=1))
        return
    args.max_tokens = args.max_tokens or (128 if args.what == "overhead" else 200)
    result = overhead(args) if args.what == "overhead" else reliability(args)
    result["machine"] = f"{platform.machine()} {platform.system()}, MLX CPU, shared 2-core box (loaded)"
    part = f"_from{args.start}" if getattr(args, "start", 0) else ""
    name = f"constrain_{args.what}{'_tiny' if args.tiny else ''}{part}.json"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("tok_s",)}, indent=1)[:2000])


if __name__ == "__main__":
    main()
