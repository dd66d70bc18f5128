"""gemma-mlx against its peers on the same converted weights, in one process, in alternating runs.

    pip install -e ".[peers]"   # mlx-lm and mlx-vlm: benchmark-only, not gemma-mlx dependencies
    python benchmarks/compare_peers.py [--rounds 3] [--out benchmarks/results/peers_cpu]

Cases (each: one warm-up per runtime, then `rounds` rounds that run ours and the peer in turn,
alternating which goes first; medians and ours/peer ratios):

- mlx-lm on Gemma 3 270M (the offline float32 checkpoint), float32 and 8-bit: both converted by
  our converter, both runtimes load the same directory. Both compute in the same dtype: our
  `load(dtype="auto")` computes quantized checkpoints in float32 on MLX's CPU backend, so the
  peer's float parameters (norms, scales, biases) are cast to the dtype ours runs in.
- mlx-vlm `gemma4_unified` on a random Gemma-4-12B-shaped 4-bit model (`gemma4_shaped.py`: real
  hidden size, FFN and head geometry, few layers, small vocabulary), plain and with the MTP
  drafter (mlx-vlm's `gemma4_unified_assistant` drafter, `draft_kind="mtp"`, on the same random
  drafter weights); plus our `bench_report` on it (GB/s and fraction of the copy bandwidth).

Prefill tok/s = prompt tokens / time to first token (prefill plus one sampled token, as
`gemma-mlx bench`); decode tok/s over the following tokens, greedy. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import load, load_drafter
from gemma_mlx.benchmark import bench_report, random_ids, timed_run
from gemma_mlx.convert import convert
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.footprint import footprint

try:
    from gemma4_shaped import build
except ImportError:  # run as a module from the repository root
    from benchmarks.gemma4_shaped import build

Timing = tuple[float, float]  # (time to first token s, decode tok/s)
Runner = Callable[[mx.array, int], Timing]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"mlx": mx.__version__}
    for name in ("mlx_lm", "mlx_vlm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "device": str(mx.default_device()),
        "versions": versions,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_tokens(tokens, n: int, start: float) -> Timing:
    """Drain `n` tokens from the generator `tokens` started at `start`."""
    next(tokens)
    first = time.perf_counter()
    for _ in islice(tokens, n - 1):
        pass
    end = time.perf_counter()
    tokens.close()
    mx.synchronize()
    return first - start, (n - 1) / (end - first)


def ours(model, drafter=None, block: int = 4) -> Runner:
    def run(ids: mx.array, n: int) -> Timing:
        r = timed_run(model, ids, n, drafter=drafter, draft_block_size=block)
        return r.ttft_s, r.decode_tps

    return run


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def mlx_lm_runner(model) -> Runner:
    from mlx_lm.generate import generate_step

    def run(ids: mx.array, n: int) -> Timing:
        start = time.perf_counter()
        return time_tokens(generate_step(ids, model, max_tokens=n, sampler=greedy), n, start)

    return run


def mlx_vlm_runner(model, drafter=None, block: int = 4) -> Runner:
    from mlx_vlm.generate.ar import generate_step

    spec = dict(draft_model=drafter, draft_kind="mtp", draft_block_size=block) if drafter is not None else {}

    def run(ids: mx.array, n: int) -> Timing:
        start = time.perf_counter()
        steps = generate_step(
            ids[None], model, None, None, max_tokens=n, temperature=0.0, sampler=greedy, **spec
        )
        return time_tokens(steps, n, start)

    return run


def alternate(runners: dict[str, Runner], ids: mx.array, n: int, rounds: int) -> dict:
    """One warm-up each, then `rounds` rounds in alternating order; per runtime the median TTFT,
    prefill and decode tok/s, and ours/peer ratios of the medians."""
    for run in runners.values():
        run(ids, n)
    times: dict[str, list[Timing]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(runners[name](ids, n))
    out = {}
    for name, runs in times.items():
        ttft = float(np.median([t for t, _ in runs]))
        out[name] = {
            "ttft_s": ttft,
            "prefill_tps": ids.shape[0] / ttft,
            "decode_tps": float(np.median([d for _, d in runs])),
            "runs": [{"ttft_s": t, "decode_tps": d} for t, d in runs],
        }
    a, b = names
    out["ratio"] = {
        k: out[a][k] / out[b][k] if k != "ttft_s" else out[b][k] / out[a][k]
        for k in ("prefill_tps", "decode_tps", "ttft_s")
    }  # > 1: ours faster (TTFT: peer's time / ours)
    return out


def float_dtype(model) -> mx.Dtype:
    """The dtype our loaded model computes in (its norms' dtype)."""
    return model.language_model.norm.weight.dtype


def case(title: str, peer: str, result: dict, **info) -> dict:
    return {"case": title, "peer": peer, **info, **result, "load_after": load_average()}


def gemma3_cases(src: Path, tmp: Path, rounds: int, prompt: int, gen: int) -> list[dict]:
    from mlx_lm.utils import load_model

    cases = []
    for label, kwargs in (("float32", dict(quantize=False)), ("8-bit", dict(bits=8, group_size=64))):
        path = tmp / f"gemma3-{label}"
        convert(src, path, progress=False, **kwargs)
        model, _ = load(path)
        peer, _ = load_model(path)
        dtype = float_dtype(model)
        peer.set_dtype(dtype)  # same compute dtype (ours: float32 on the CPU for quantized weights)
        ids = random_ids(model, prompt)
        result = alternate({"gemma-mlx": ours(model), "mlx-lm": mlx_lm_runner(peer)}, ids, gen, rounds)
        cases.append(
            case(
                f"Gemma 3 270M {label}",
                "mlx-lm",
                result,
                prompt_tokens=prompt,
                generation_tokens=gen,
                dtype=str(dtype),
            )
        )
        print(json.dumps(cases[-1]["ratio"]), cases[-1]["case"], flush=True)
        del model, peer
    return cases


def gemma4_cases(
    tmp: Path, rounds: int, prompt: int, gen: int, layers: int, vocab: int, block: int, hidden: int
) -> list[dict]:
    """`tmp/target` and `tmp/drafter` are built unless they exist (`gemma4_shaped.py --drafter`)."""
    from mlx_vlm.speculative.drafters import load_drafter as vlm_load_drafter
    from mlx_vlm.utils import load_model

    paths = {"target": tmp / "target", "drafter": tmp / "drafter"}
    if not all((p / "config.json").is_file() for p in paths.values()):
        paths = build(tmp, layers=layers, vocab=vocab, bits=4, drafter=True, hidden=hidden)
    config = json.loads((paths["target"] / "config.json").read_text())["text_config"]
    layers, vocab, hidden = config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]
    model, _ = load(paths["target"])
    dtype = float_dtype(model)
    peer = load_model(paths["target"])
    peer.set_dtype(dtype)
    shape = dict(layers=layers, vocab=vocab, bits=4, hidden=hidden, dtype=str(dtype))
    ids = random_ids(model, prompt)
    plain = alternate({"gemma-mlx": ours(model), "mlx-vlm": mlx_vlm_runner(peer)}, ids, gen, rounds)
    cases = [
        case("Gemma-4-shaped 4-bit", "mlx-vlm", plain, prompt_tokens=prompt, generation_tokens=gen, **shape)
    ]
    print(json.dumps(cases[-1]["ratio"]), cases[-1]["case"], flush=True)
    drafter = load_drafter(paths["drafter"])
    peer_drafter, kind = vlm_load_drafter(str(paths["drafter"]))
    assert kind == "mtp", kind
    peer_drafter.set_dtype(drafter.pre_projection.weight.dtype)
    spec = alternate(
        {"gemma-mlx": ours(model, drafter, block), "mlx-vlm": mlx_vlm_runner(peer, peer_drafter, block)},
        ids,
        gen,
        rounds,
    )
    spec["mlx-vlm"]["accept_lens"] = list(getattr(peer_drafter, "accept_lens", []))[-32:]
    cases.append(
        case(
            "Gemma-4-shaped 4-bit + MTP drafter",
            "mlx-vlm",
            spec,
            prompt_tokens=prompt,
            generation_tokens=gen,
            draft_block_size=block,
            **shape,
        )
    )
    print(json.dumps(cases[-1]["ratio"]), cases[-1]["case"], flush=True)
    del peer, peer_drafter
    report = bench_report(
        model,
        footprint(paths["target"]).bytes_per_token,
        prompt_lengths=[prompt],
        depths=[0],
        generation_tokens=gen,
        trials=max(1, rounds - 1),
        drafter=drafter,
        draft_block_size=block,
    )
    cases.append(
        {
            "case": "Gemma-4-shaped 4-bit, gemma-mlx bench",
            **shape,
            "bench": report,
            "load_after": load_average(),
        }
    )
    return cases


def markdown(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}, {m['device']}; MLX {v['mlx']}, "
        f"mlx-lm {v['mlx_lm']}, mlx-vlm {v['mlx_vlm']}. Load average before {results['load_before']}.",
        f"Median of {results['rounds']} alternating rounds after one warm-up each; ratio > 1: gemma-mlx "
        "faster (TTFT ratio: peer's time / ours).",
        "",
        "| case | runtime | prompt | TTFT s | prefill tok/s | decode tok/s | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        if "bench" in c:
            continue
        for name in ("gemma-mlx", c["peer"]):
            r = c[name]
            lines.append(
                f"| {c['case']} | {name} | {c['prompt_tokens']} | {r['ttft_s']:.2f} | "
                f"{r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | |"
            )
        q = c["ratio"]
        lines.append(
            f"| {c['case']} | **ours/{c['peer']}** | | **{q['ttft_s']:.2f}** | **{q['prefill_tps']:.2f}** | "
            f"**{q['decode_tps']:.2f}** | {c['load_after']} |"
        )
    for c in results["cases"]:
        if "bench" not in c:
            continue
        b = c["bench"]
        d, pre = b["decode"][0], b["prefill"][0]
        lines += [
            "",
            f"{c['case']} ({c['layers']} layers, vocab {c['vocab']}, computing in {c['dtype']}):",
            f"prefill {pre['prefill_tps']:.1f} tok/s ({pre['prompt_tokens']} tokens), "
            f"decode {d['decode_tps']:.2f} tok/s, {d['bytes_per_token'] / 1e6:.0f} MB/token -> "
            f"{d['gb_per_s']:.2f} GB/s = {d['bandwidth_fraction']:.0%} of the measured copy bandwidth "
            f"({b['copy_bandwidth_gb_per_s']:.1f} GB/s); peak memory {b['peak_memory_gb']:.2f} GB.",
        ]
        if "draft" in b:
            dr = b["draft"]
            lines.append(
                f"with the random drafter (<= {dr['max_block_size']} tokens/round): "
                f"{dr['decode_tps']:.2f} tok/s, {dr['speedup']:.2f}x plain, {dr['drafted']} drafted, "
                f"{dr['accepted']} accepted."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=None, help="Gemma 3 source (default: the offline 270M)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--generation-tokens", type=int, default=16)
    p.add_argument("--g4-prompt-tokens", type=int, default=32)
    p.add_argument("--g4-generation-tokens", type=int, default=12)
    p.add_argument("--g4-layers", type=int, default=2)
    p.add_argument("--g4-vocab", type=int, default=16384)
    p.add_argument("--g4-hidden", type=int, default=3840, help="other values: quick plumbing checks only")
    p.add_argument("--g4-dir", type=Path, default=None, help="reuse target/ and drafter/ built here")
    p.add_argument("--draft-block-size", type=int, default=4)
    p.add_argument("--only", choices=("gemma3", "gemma4"), default=None)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    a = p.parse_args()
    results = {"machine": machine(), "load_before": load_average(), "rounds": a.rounds, "cases": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if a.only != "gemma4":
            src = a.model or default_model_path()
            results["cases"] += gemma3_cases(src, Path(tmp), a.rounds, a.prompt_tokens, a.generation_tokens)
        if a.only != "gemma3":
            results["cases"] += gemma4_cases(
                a.g4_dir or Path(tmp) / "gemma4",
                a.rounds,
                a.g4_prompt_tokens,
                a.g4_generation_tokens,
                a.g4_layers,
                a.g4_vocab,
                a.draft_block_size,
                a.g4_hidden,
            )
    results["wall_s"] = time.perf_counter() - start
    text = markdown(results)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".md").write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
