"""DWQ 4-bit (`convert --method dwq`, `gptq+dwq`) against RTN / GPTQ on the real Gemma 3 270M,
held-out text.

    LD_PRELOAD=$OPENBLAS python benchmarks/dwq_quality.py [--tokens 512] [--samples 32] [--length 256]
        [--steps 64] [--lr 1e-5] [--batch-size 4] [--top-k 32] [--calibration builtin|FILE.txt]
        [--train-embedding-scales] [--only NAME ...] [--out FILE.md]

Variants are made by `gemma_mlx.convert.convert` from the offline default model's float32
checkpoint and measured as benchmarks/calibrated_quality.py measures them (its `host_linears`,
`bpw_bf16`): the first `--tokens` tokens of benchmarks/data/genesis_kjv.txt, float32 reference.
For an in-domain but held-out calibration file use text after the evaluated part, e.g.
`tail -c +20000 benchmarks/data/genesis_kjv.txt > /tmp/genesis_rest.txt` (the first 512 tokens
are ~2,000 characters).

Training runs in MLX (autodiff); on Linux CPU MLX's float32 matmul is the netlib reference BLAS, so
run it with OpenBLAS interposed (benchmarks/openblas_cpu.py says how: `LD_PRELOAD`), ~10x faster.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_quality import TEXT, bpw_bf16, convert_and_compare, host_linears  # noqa: E402

from gemma_mlx import load  # noqa: E402
from gemma_mlx.convert import dwq  # noqa: E402
from gemma_mlx.convert.default_model import default_model_path  # noqa: E402
from gemma_mlx.quality import compare, log_probs  # noqa: E402

VARIANTS: dict[str, dict] = {
    "RTN 4-bit g64": dict(bits=4, group_size=64),
    "DWQ 4-bit g64": dict(bits=4, group_size=64, method="dwq"),
    "GPTQ 4-bit g64": dict(bits=4, group_size=64, method="gptq"),
    "GPTQ+DWQ 4-bit g64": dict(bits=4, group_size=64, method="gptq+dwq"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=dwq.STEPS)
    ap.add_argument("--lr", type=float, default=dwq.LEARNING_RATE)
    ap.add_argument("--batch-size", type=int, default=dwq.BATCH_SIZE)
    ap.add_argument("--top-k", type=int, default=dwq.TOP_K)
    ap.add_argument("--calibration", default="builtin")
    ap.add_argument("--train-embedding-scales", action="store_true", help="the tied embedding's too")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true", help="progress and each step's KL on stderr")
    args = ap.parse_args()
    dwq.LEARNING_RATE, dwq.BATCH_SIZE, dwq.TOP_K = args.lr, args.batch_size, args.top_k
    dwq.TRAIN_EMBEDDING = args.train_embedding_scales
    path = default_model_path()
    model, processor = load(path)
    ids = processor.encode_prompt(TEXT.read_text())[: args.tokens]
    reference = log_probs(host_linears(model), ids)
    float_ppl = compare(reference, reference, ids).perplexity
    del model
    command = "python benchmarks/dwq_quality.py " + " ".join(sys.argv[1:])
    rows, details = [], []

    def write() -> None:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        table = "\n".join(
            [
                f"Gemma 3 270M (offline default model, float32), {len(ids)} held-out tokens of "
                f"benchmarks/data/genesis_kjv.txt; calibration: {args.calibration}, {args.samples} x "
                f"{args.length} tokens. DWQ: {args.steps} Adam steps, learning rate {args.lr}, batches of "
                f"{args.batch_size}, KL on the union of the teacher's top-{args.top_k} tokens per batch, "
                f"embedding scales {'trained' if args.train_embedding_scales else 'frozen (RTN)'}. "
                "Scales/biases stored float32 (bits/weight as shipped with bfloat16). "
                f"MLX {mx.__version__}, {platform.machine()} CPU, 2 shared cores, "
                f"load at the end: `{uptime}`.",
                "",
                f"Command: `{command}`",
                "",
                "| variant | bits/weight (bf16) | perplexity | top-1 agreement | mean KL (nats) "
                "| conversion (s) |",
                "|---|---|---|---|---|---|",
                f"| float32 (reference) | 32.00 | {float_ppl:.3f} | 1.000 | 0 | - |",
                *rows,
                "",
                *details,
            ]
        )
        print(table, flush=True)
        if args.out:
            args.out.write_text(table + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kwargs) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            report, q, seconds = convert_and_compare(
                path,
                Path(tmp) / str(i),
                reference,
                ids,
                progress=args.verbose,
                calibration=args.calibration,
                calibration_samples=args.samples,
                calibration_length=args.length,
                dwq_steps=args.steps,
                **kwargs,
            )
            rows.append(
                f"| {name} | {bpw_bf16(path, kwargs):.2f} | {q.perplexity:.3f} | "
                f"{q.top1_agreement:.3f} | {q.mean_kl:.4f} | {seconds:.0f} |"
            )
            c = report.calibration
            if isinstance(c, dwq.DistillReport):
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                every = max(1, len(c.losses) // 16)
                n = len(c.vocab)
                passes = [np.mean(c.losses[k : k + n]) for k in range(0, len(c.losses), n)]
                trajectory = ", ".join(f"{k}: {c.losses[k]:.3f}" for k in range(0, len(c.losses), every))
                details += [
                    f"{name}: DWQ {c.seconds:.0f} s ({c.tokens:,} calibration tokens, "
                    f"{c.seconds / max(len(c.losses), 1):.1f} s per step including the teacher pass), "
                    f"restricted vocabularies {min(c.vocab)}-{max(c.vocab)} tokens; MLX peak "
                    f"{c.peak_bytes / 1e9:.2f} GB, process max RSS {rss:.1f} GB.",
                    f"Restricted vs full-vocabulary KL on the first calibration prompt: before training "
                    f"{c.restricted_kl[0]:.4f} vs {c.full_kl[0]:.4f}, after {c.restricted_kl[1]:.4f} vs "
                    f"{c.full_kl[1]:.4f}.",
                    f"Training KL (restricted, per step: batch's KL before the step): {trajectory}, "
                    f"last: {c.losses[-1]:.3f}; mean of each pass over the {n} batches: "
                    f"{', '.join(f'{x:.3f}' for x in passes)}."
                    if c.losses
                    else "No training steps.",
                    "",
                ]
            print(rows[-1], flush=True)
            write()
            for f in Path(report.out).iterdir():
                f.unlink()


if __name__ == "__main__":
    main()
