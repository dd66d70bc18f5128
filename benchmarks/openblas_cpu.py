"""MLX's Linux CPU wheel with an optimized BLAS interposed: prefill and decode of Gemma 3 270M
with the wheel's own reference BLAS against OpenBLAS loaded with LD_PRELOAD.

    python benchmarks/openblas_cpu.py [--rounds 3] [--lib /path/libopenblas.so] [--out FILE.json]

`libmlx.so` takes `cblas_sgemm` from the dynamic linker (its own `mlx_cpu.libs/libblas` is the
netlib reference implementation); a library in LD_PRELOAD that exports the standard symbol wins.
The environment variable has to be set before the process starts, so every measurement is a fresh
subprocess; the variants alternate round by round. Default libraries: any OpenBLAS in this
environment that exports `cblas_sgemm` (opencv-python's bundled copy, which mlx-vlm pulls in;
cmeel-openblas's `cmeel.prefix/lib/libopenblas.so`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

MEASURE = """
import json, sys, time
import mlx.core as mx
from gemma_mlx import load
from gemma_mlx.benchmark import benchmark
from gemma_mlx.convert.default_model import default_model_path
a = mx.random.normal((256, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a, b)
times = []
for _ in range(4):
    t = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - t)
model, _ = load(default_model_path())
s = benchmark(model, int(sys.argv[1]), int(sys.argv[2]), trials=1)
print(json.dumps({"sgemm_gflops": 2 * 256 * 1024 * 1024 / min(times) / 1e9,
                  "prefill_tps": s.prompt_tps, "decode_tps": s.generation_tps}))
"""


def exports_sgemm(path: Path) -> bool:
    try:
        return hasattr(ctypes.CDLL(str(path)), "cblas_sgemm")
    except OSError:
        return False


def found_libraries() -> list[Path]:
    site = Path(sysconfig.get_paths()["purelib"])
    candidates = sorted(site.glob("opencv_python*.libs/libopenblas*.so*")) + sorted(
        site.glob("cmeel.prefix/lib/libopenblas*.so")
    )
    return [p for p in candidates if exports_sgemm(p)]


def measure(lib: Path | None, prompt: int, gen: int, threads: int | None = None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if lib is not None:
        env["LD_PRELOAD"] = str(lib)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(prompt), str(gen)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--generation-tokens", type=int, default=16)
    p.add_argument("--lib", type=Path, action="append", help="an OpenBLAS .so (default: found ones)")
    p.add_argument("--threads", type=int, action="append", help="also with OPENBLAS_NUM_THREADS=N")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    libs = a.lib or found_libraries()
    for lib in libs:
        if not exports_sgemm(lib):
            sys.exit(f"{lib}: cannot be loaded or does not export cblas_sgemm")
    variants = {"reference BLAS (wheel)": (None, None)}
    for lib in libs:
        variants[f"LD_PRELOAD={lib.name}"] = (lib, None)
        for n in a.threads or []:
            variants[f"LD_PRELOAD={lib.name} OPENBLAS_NUM_THREADS={n}"] = (lib, n)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    load_before = os.getloadavg()
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(
                measure(*variants[name][:1], a.prompt_tokens, a.generation_tokens, variants[name][1])
            )
            print(name, runs[name][-1], flush=True)
    base = names[0]
    med = {n: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for n, rs in runs.items()}
    result = {
        "prompt_tokens": a.prompt_tokens,
        "generation_tokens": a.generation_tokens,
        "rounds": a.rounds,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "libraries": {n: str(lib) if lib else None for n, (lib, _) in variants.items()},
        "median": med,
        "speedup": {n: {k: med[n][k] / med[base][k] for k in med[n]} for n in names[1:]},
        "runs": runs,
    }
    print(json.dumps(result["median"], indent=1), json.dumps(result["speedup"], indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
