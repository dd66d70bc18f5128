"""The cost model behind the adaptive draft depth: a verify pass over k tokens against one plain
decode step, at several context depths.

    python benchmarks/verify_cost.py [--model DIR] [--depths 0,256] [--sizes 1,2,4,8]

Each pass feeds k tokens after a prompt of `depth` tokens and is trimmed off again, so every pass
sees the same cache. The ratio time(k) / time(1) is what `DraftControl` measures while generating:
about 1 on a bandwidth-bound GPU (long blocks pay), about k on a compute-bound CPU (plain decoding).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import load, make_cache
from gemma_mlx.benchmark import random_ids
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.generate import prefill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path)
    p.add_argument("--depths", default="0,256")
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--passes", type=int, default=5)
    a = p.parse_args()
    path = a.model or default_model_path()
    model, _ = load(path)
    depths, sizes = [int(d) for d in a.depths.split(",")], [int(k) for k in a.sizes.split(",")]
    print(
        f"{path.name}; MLX {mx.__version__}, {platform.machine()} {platform.system()} "
        f"({mx.default_device()}); median of {a.passes} passes after a warm-up\n"
    )
    print(
        "| depth | "
        + " | ".join(f"k={k} (ms)" for k in sizes)
        + " | "
        + " | ".join(f"k={k} / k=1" for k in sizes[1:])
        + " |"
    )
    print("|---" * (2 * len(sizes)) + "|")
    for depth in depths:
        cache = make_cache(model)
        if depth:
            prefill(model, random_ids(model, depth), cache)
        times = []
        for k in sizes:
            block = random_ids(model, k, seed=k)[None]
            runs = []
            for _ in range(a.passes + 1):
                start = time.perf_counter()
                mx.eval(model(block, cache))
                runs.append(time.perf_counter() - start)
                for c in cache:
                    c.trim(k)
            times.append(float(np.median(runs[1:])))
        row = [f"{t * 1e3:.1f}" for t in times] + [f"{t / times[0]:.2f}" for t in times[1:]]
        print(f"| {depth} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
